"""End to end on real MNIST: the example script with tiny flags, the CLI, SIGTERM in a real process."""

import json
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_models.app.cli import main as cli_main
from ppl_models.infer.checkpoint import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

TINY = ["-o", "data.limit_train=256", "-o", "data.limit_valid=64", "-o", "data.limit_test=32", "--no-progress"]


def per_image(run_dir: Path) -> dict:
    """The per-image ELBO and IWAE estimates that a run's evaluation wrote to eval.nc."""
    from ppl_models.infer import diagnostics

    idata = diagnostics.load_netcdf(run_dir / "eval.nc")
    observed = json.loads((run_dir / "metrics.json").read_text())["observed"]
    assert idata.vi_evaluation.attrs["observed"] == observed
    return {"elbo": idata.vi_evaluation["elbo"].values.reshape(-1),
            "log_likelihood": idata.vi_evaluation["log_likelihood"].values.reshape(-1)}


def paired_mean_and_se(a, b):
    """Mean over images of b - a and its standard error."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    return d.mean(), d.std(ddof=1) / np.sqrt(len(d))


def assert_reevaluation_agrees(run_dir: Path, num_samples: int) -> None:
    """Evaluate the run's newest checkpoint again with fresh draws: the same estimators of the same model on the
    same images, so per image the new minus the reported ELBO (and IWAE-K) averages to 0 within 5 standard errors
    of the paired differences; a report from other parameters, images or K shifts it."""
    from ppl_models.app.experiment import Experiment

    reported = per_image(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["log_likelihood"] == pytest.approx(reported["log_likelihood"].mean(), rel=1e-9, abs=1e-9)
    torch.manual_seed(12345)  # draws independent of the reported evaluation's
    again = Experiment.from_run_dir(run_dir).evaluate(num_samples=num_samples)
    for name in ("elbo", "log_likelihood"):
        mean, se = paired_mean_and_se(reported[name], getattr(again, name))
        assert abs(mean) <= 5 * se, (name, mean, se)


@pytest.mark.slow
def test_vae_mnist_example_runs_with_tiny_flags(tmp_path, shared_data):
    import vae_mnist

    args = Namespace(
        config=str(vae_mnist.CONFIG), num_epochs=1, z_dim=4, guide=None, num_samples=8, seed=0, data_dir=None,
        limit_train=256, limit_valid=64, limit_test=32, run_dir=str(tmp_path / "run"), resume=False, no_progress=True,
    )
    summary = vae_mnist.main(args)
    assert summary["num_data"] == 32 and summary["num_samples"] == 8
    assert summary["log_likelihood"] == pytest.approx(per_image(tmp_path / "run")["log_likelihood"].mean())
    assert_reevaluation_agrees(tmp_path / "run", num_samples=8)
    for name in ("config.toml", "history.json", "metrics.json", "eval.nc", "elbo.png", "prior_samples.png", "reconstructions.png"):
        assert (tmp_path / "run" / name).is_file(), name


@pytest.mark.slow
def test_cli_fit_then_evaluate(tmp_path, shared_data, capsys):
    run_dir = tmp_path / "run"
    code = cli_main(["fit", "examples/configs/vae_mnist.toml", "--run-dir", str(run_dir), "--num-epochs", "1",
                     "--num-samples", "4", "-o", "model.z_dim=4", "-o", "model.hidden_dims=[32]",
                     "-o", "guide.hidden_dims=[32]", *TINY])
    assert code == 0
    first = json.loads((run_dir / "metrics.json").read_text())
    assert first["num_samples"] == 4
    first_images = per_image(run_dir)
    assert cli_main(["evaluate", str(run_dir), "--num-samples", "16", "--no-progress"]) == 0
    second = json.loads((run_dir / "metrics.json").read_text())
    assert second["num_samples"] == 16 and second["num_data"] == 32
    second_images = per_image(run_dir)
    # The evaluation from the checkpoint scores the model that fit evaluated: per image, the ELBO estimates
    # (unbiased for the same ELBO whatever K) agree within 5 standard errors of their paired differences, and
    # E[IWAE-16] >= E[IWAE-4] (Burda et al. 2016): not below by more than 5 of them.
    mean, se = paired_mean_and_se(first_images["elbo"], second_images["elbo"])
    assert abs(mean) <= 5 * se, (mean, se)
    mean, se = paired_mean_and_se(first_images["log_likelihood"], second_images["log_likelihood"])
    assert mean >= -5 * se, (mean, se)
    out = capsys.readouterr().out
    assert '"log_likelihood"' in out


@pytest.mark.slow
def test_sigterm_mid_epoch_in_a_real_process(tmp_path, shared_data):
    """SIGTERM while training: exit status 143, a loadable checkpoint, the previous one intact."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "ppl_models", "fit", "examples/configs/vae_mnist.toml", "--run-dir", str(run_dir),
           "--num-epochs", "1000", "--no-evaluate", "-o", "model.z_dim=4", "-o", "model.hidden_dims=[32]",
           "-o", "guide.hidden_dims=[32]", "-o", "data.limit_train=2048", "-o", "train.batch_size=16",
           "-o", "train.validate=false", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list_checkpoints(run_dir / "checkpoints")) < 1:  # the first epoch's checkpoint
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        time.sleep(0.3)  # into the second epoch
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    files = list_checkpoints(run_dir / "checkpoints")
    states = [load_checkpoint(f) for f in files]
    assert len(states) == 2
    assert states[0]["batch_in_epoch"] == 0 and states[0]["epoch"] >= 1  # an epoch-end checkpoint, intact
    assert states[-1]["step"] > states[0]["step"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.slow
def test_inference_strategies_example_runs_with_tiny_flags(tmp_path, shared_data):
    import inference_strategies

    from ppl_models.app.experiment import Experiment
    from ppl_models.infer.evaluate import evaluate

    rows = list(inference_strategies.ROWS)  # all five, end-to-end included
    args = inference_strategies.build_parser().parse_args([
        "--strategies", *rows, "--max-steps", "3", "--num-test", "8", "--num-samples", "4", "--limit-train", "256",
        "--refine-steps", "3", "--gap-steps", "2", "5", "--out", str(tmp_path / "example"), "--no-progress",
        "-o", "model.z_dim=4", "-o", "model.hidden_dims=[32]", "-o", "guide.hidden_dims=[32]",
        "-o", "train.batch_size=64", "-o", "train.inner_steps=2", "-o", "evaluate.batch_size=8",
    ])
    report = inference_strategies.main(args)
    settings = report["settings"]
    assert settings["train"]["max_steps"] == 3 and settings["train"]["time_limit"] is None
    assert settings["evaluate"]["num_samples"] == 4
    assert [r["strategy"] for r in report["strategies"]] == rows
    for r in report["strategies"]:  # a budget in θ steps, not seconds: the same work on a busy machine
        assert r["theta_steps"] == 3 and r["epochs"] == 0.75, r  # 256 images, batches of 64
    assert report["strategies"][0]["test_lambda"] == "3 adam steps from the prior"
    # The amortized row recomputed through the package's own path (Experiment.fit writes a checkpoint, loaded
    # back): the same seed and θ steps give the same networks, and the example's evaluation draws (generator
    # seed 1) the same per-image log weights, so the test ELBO and IWAE are equal, not merely close.
    experiment = Experiment(inference_strategies.load(args).with_overrides({"train.strategy": "amortized"}),
                            tmp_path / "amortized")
    experiment.fit(evaluate=False)
    splits = experiment.load_data()
    inst = experiment.build(splits["train"].num_data)
    assert experiment.trainer(splits, inst, progress=False).resume() is not None
    res = evaluate(inst.model, inst.guide, splits["test"], spec=inst.spec, num_samples=4, batch_size=8,
                   progress=False, generator=torch.Generator().manual_seed(1))
    (amortized,) = [r for r in report["strategies"] if r["strategy"] == "amortized"]
    assert amortized["test_elbo"] == round(res.mean_and_se("elbo")[0], 3)
    assert amortized["test_nll"] == round(-res.mean_and_se("log_likelihood")[0], 3)
    gap = report["amortization_gap"]
    assert gap["num_test"] == 8 and {"elbo_encoder", "elbo_refined_2", "elbo_refined_5", "iwae"} <= set(gap)
    assert gap["elbo_encoder"] == pytest.approx(res.mean_and_se("elbo")[0], rel=1e-12)
    assert gap["iwae"] == pytest.approx(res.mean_and_se("log_likelihood")[0], rel=1e-12)
    for name in ("strategies.json", "strategies.csv", "strategies.png"):
        assert (tmp_path / "example" / name).is_file()
