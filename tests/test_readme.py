"""The README as a new user runs it: the "Using it" commands in order, then each example script in the same
directory; and the README's other promises that a first session meets (plain ``pyro.infer.SVI`` scales a minibatch,
``--resume`` reads the run's own configuration, one-line errors, packaging).

The commands run as written, in a temporary working directory (``runs/...`` land there), with tiny overrides
appended so that CI affords them: a few hundred training images, 2 to 6 steps, a handful of importance samples, the
fast path off (its compile costs 15-75 s and has its own tests, ``tests/test_fastpath.py``).  Placeholders are
substituted: ``CONFIG.toml`` is the VAE's config, ``SRC.txt``/``TGT.txt`` three Multi30k test sentences.
"""

from __future__ import annotations

import gzip
import json
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pyro
import pytest
import torch

import ppl_models as pm
from ppl_models.app.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
#: The VAE runs of the README: 256 training images, 32 test images, small networks, Pyro's ELBO every step.
VAE_TINY = ["-o", "data.limit_train=256", "-o", "data.limit_valid=64", "-o", "data.limit_test=32",
            "-o", "train.fast_path=false", "-o", "evaluate.fast_path=false", "-o", "guide.hidden_dims=[32]",
            "--num-samples", "4", "--no-progress"]
ATTENTION_TINY = ["-o", "data.limit_train=64", "-o", "data.limit_valid=16", "-o", "data.limit_test=6",
                  "-o", "train.max_steps=2", "-o", "model.emb_dim=16", "-o", "model.hidden_dim=16",
                  "-o", "model.out_dim=16", "-o", "guide.emb_dim=16", "-o", "guide.hidden_dim=16", "--no-progress"]


def using_it() -> list:
    """The command lines of the README's "Using it" bash block, in order (comments stripped)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Using it"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def compare_small_overrides() -> list:
    """``examples/configs/compare_small.toml`` as ``-o`` overrides (all but its run directory): the comparison in
    seconds."""
    out = []
    for section, table in tomllib.loads((REPO / "examples/configs/compare_small.toml").read_text()).items():
        for key, value in table.items():
            if key != "run_dir":
                out += ["-o", f"{section}.{key}={json.dumps(value)}"]
    return out


def tiny(argv: list, workdir: Path) -> list:
    """The README command ``argv`` as this test runs it (see the module docstring)."""
    argv = [a.replace("5000", "4") if argv[:2] == ["ppl-models", "evaluate"] else a for a in argv]
    extra = []
    if argv[0] == "ppl-models":
        command = argv[1]
        if command == "fit" and "vae_mnist.toml" in argv[2]:
            extra = VAE_TINY + ["-o", f"train.max_steps={4 if '--resume' in argv else 2}"]
        elif command == "fit" and argv[2] == "CONFIG.toml":
            argv[2] = "examples/configs/vae_mnist.toml"
            extra = VAE_TINY + ["-o", "train.max_steps=2", "-o", "model.hidden_dims=[32]", "--run-dir", "runs/nproc"]
        elif command == "fit" and "attention_multi30k.toml" in argv[2]:
            extra = ATTENTION_TINY
        elif command == "evaluate":
            extra = ["--no-progress"]
        elif command == "compare":
            extra = compare_small_overrides() + ["--no-progress"]
        elif command == "align":
            argv = [str(workdir / "src.txt") if a == "SRC.txt" else str(workdir / "tgt.txt") if a == "TGT.txt" else a
                    for a in argv]
            extra = ["--no-progress"]
        argv = [PYTHON, "-m", "ppl_models", *argv[1:]]
    elif argv[0] == "python" and argv[1] == "examples/vae_mnist.py":
        extra = ["-o", "train.max_steps=2", "-o", "train.fast_path=false", "-o", "evaluate.fast_path=false",
                 "-o", "model.hidden_dims=[32]", "-o", "guide.hidden_dims=[32]", "--no-progress"]
        argv = [PYTHON, *argv[1:]]
    else:
        raise AssertionError(f"README line {' '.join(argv)!r}: this test does not know how to run it; teach tiny()")
    return [str(REPO / a) if a.startswith("examples/") else a for a in argv] + extra


def run(argv: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2 and stderr's last line ``error: ...`` naming ``fragments``; no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(f in line for f in fragments), line
    return line


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory, shared_data):
    """The "Using it" lines run in order in one working directory: ``(workdir, [(line, process), ...])``."""
    workdir = tmp_path_factory.mktemp("readme")
    for name, lang in (("src.txt", "en"), ("tgt.txt", "fr")):
        with gzip.open(shared_data / "multi30k" / f"test_2016_flickr.lc.norm.tok.{lang}.gz", "rt") as f:
            (workdir / name).write_text("".join(next(f) for _ in range(3)))
    done = []
    for argv in using_it():
        proc = run(tiny(list(argv), workdir), workdir)
        done.append((" ".join(argv), proc))
        if proc.returncode != 0:
            break  # the next lines build on this one
    return workdir, done


@pytest.mark.slow
def test_using_it_lines_run_in_order(readme_runs):
    workdir, done = readme_runs
    for line, proc in done:
        assert proc.returncode == 0, (line, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, (line, proc.stderr[-3000:])
    assert len(done) == len(using_it()) == 9
    out = {line.split("#")[0].strip(): proc for line, proc in done}
    assert "ppca" in out["ppl-models list"].stdout and "svi-inner" in out["ppl-models list"].stdout
    run_dir = workdir / "runs" / "vae_mnist"
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["train"]["lr"] == 3e-4 and config["model"]["hidden_dims"] == [500]
    # --resume read the run's own configuration (lr, hidden_dims not repeated), said what the file would have
    # changed, and continued from step 2 to the extended budget of 4 steps
    resumed = next(proc for line, proc in done if "--resume" in line)
    assert "note: resuming the run recorded in" in resumed.stderr and "train.lr = 0.001 (the run: 0.0003)" in resumed.stderr
    assert json.loads((run_dir / "train.json").read_text())["step"] == 4
    assert json.loads((run_dir / "metrics.json").read_text())["num_samples"] == 4  # the evaluate line's K
    small = json.loads((workdir / "runs" / "vae_small" / "metrics.json").read_text())
    assert small["num_samples"] == 10 and small["num_data"] == 64
    assert (workdir / "runs" / "compare_estimators" / "report.md").is_file()
    assert json.loads((workdir / "runs" / "attention_multi30k" / "metrics.json").read_text())["num_data"] == 6
    align = next(proc for line, proc in done if line.startswith("ppl-models align"))
    assert len(align.stdout.splitlines()) == 3
    assert json.loads((workdir / "runs" / "nproc" / "train.json").read_text())["step"] == 2


@pytest.mark.slow
def test_resume_refuses_a_changed_setting_naming_the_key_and_both_values(readme_runs):
    workdir, _ = readme_runs
    proc = run([PYTHON, "-m", "ppl_models", "fit", str(REPO / "examples/configs/vae_mnist.toml"), "--resume",
                "-o", "train.lr=0.01", "--no-progress"], workdir)
    assert_one_error_line(proc, "cannot resume", "train.lr: 0.0003 in the run, 0.01 now")


EXAMPLES = {
    # the CLI's run directory holds another run: one line, exit 2; then the same script continues it (--resume)
    "vae_mnist": [(["examples/vae_mnist.py", "--no-progress"], "already holds a run"),
                  (["examples/vae_mnist.py", "--resume", "-o", "train.max_steps=6", "-o", "train.fast_path=false",
                    "-o", "evaluate.fast_path=false", "--num-samples", "2", "--no-progress"], None)],
    "ppca": [(["-m", "ppl_models", "fit", "examples/configs/ppca.toml", "--num-epochs", "1", "--num-samples", "4",
               "--no-progress"], None),
             (["examples/ppca.py", "--num-epochs", "1", "--no-progress"], "already holds a run"),
             (["examples/ppca.py", "--num-epochs", "1", "--num-samples", "4", "--run-dir", "runs/ppca_example",
               "--no-progress"], None)],
    "cvae_mnist": [(["examples/cvae_mnist.py", "--num-quadrant-inputs", "2", "--num-epochs", "1", "--baseline-time",
                     "none", "--cvae-time", "none", "--limit-train", "128", "--limit-test", "8", "--num-samples", "2",
                     "--z-dim", "2", "--hidden-dims", "16", "--no-progress"], None)],
    "compare_estimators": [(["examples/compare_estimators.py", "--config", "examples/configs/compare_estimators.toml",
                             *compare_small_overrides(), "--no-progress"], None)],
    "attention_multi30k": [(["examples/attention_multi30k.py", "--variants", "exact", "--max-steps", "2",
                             "--limit-train", "64", "--limit-test", "6", "--run-root", "runs/attention_example",
                             "--no-progress"], None)],
    "inference_strategies": [(["examples/inference_strategies.py", "--strategies", "amortized", "svi-inner",
                               "--max-steps", "2", "--num-test", "8", "--num-samples", "4", "--limit-train", "256",
                               "--refine-steps", "2", "--gap-steps", "2", "--out", "runs/strategies", "--no-progress",
                               "-o", "model.z_dim=4", "-o", "model.hidden_dims=[32]", "-o", "guide.hidden_dims=[32]",
                               "-o", "train.batch_size=64", "-o", "train.inner_steps=2",
                               "-o", "evaluate.batch_size=8"], None)],
    "ptb_language_models": [(["examples/ptb_language_models.py", "--config", "examples/configs/ptb_text_vae_tricks.toml",
                              "--run-dir", "runs/ptb/vae", "-o", "data.limit_train=64", "-o", "train.max_steps=2",
                              "-o", "train.batch_size=32", "-o", "model.embed_dim=8", "-o", "model.hidden_dim=8",
                              "-o", "guide.embed_dim=8", "-o", "guide.hidden_dim=8", "-o", "evaluate.test_subset=6",
                              "-o", "evaluate.num_samples=2", "-o", "evaluate.big_k_sentences=2",
                              "-o", "evaluate.big_num_samples=4", "-o", "evaluate.num_prior_samples=2"], None)],
}


def test_every_example_script_is_run_here():
    assert sorted(EXAMPLES) == sorted(p.stem for p in (REPO / "examples").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_scripts_after_the_cli_in_the_same_directory(readme_runs, name):
    workdir, done = readme_runs
    if any(proc.returncode != 0 for _, proc in done):
        pytest.skip("the README's lines did not all run (test_using_it_lines_run_in_order says why)")
    for argv, refusal in EXAMPLES[name]:
        proc = run([PYTHON, *[str(REPO / a) if a.startswith("examples/") else a for a in argv]], workdir)
        if refusal is not None:
            assert_one_error_line(proc, refusal)
        else:
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, (argv, proc.stderr[-3000:])
    if name == "vae_mnist":  # the script continued the CLI's run with the run's configuration
        assert json.loads((workdir / "runs" / "vae_mnist" / "train.json").read_text())["step"] == 6


# ------------------------------------------------------------------------------------------ promises, quick


def test_plain_svi_scales_a_minibatch_by_n_over_b():
    """``instantiate(..., num_data=N)`` binds N: ``pyro.infer.SVI(model, guide, ...).step(x, idx)`` returns the
    minibatch's -ELBO scaled by N / B (the same draws: the same seed), as the README says."""
    N, B = 1000, 10
    inst = pm.instantiate("vae", "amortized", num_data=N, model_kwargs={"z_dim": 2, "hidden_dims": [8]},
                          guide_kwargs={"hidden_dims": [8]})
    x, idx = torch.rand(B, 784).bernoulli(), torch.arange(B) * 7
    elbo = pyro.infer.Trace_ELBO()
    pyro.set_rng_seed(1)
    unscaled = elbo.loss(inst.model, inst.guide, x, idx, num_data=None)
    pyro.set_rng_seed(1)  # without idx the batch is the whole data set: nothing to scale
    assert elbo.loss(inst.model, inst.guide, x) == pytest.approx(unscaled, rel=1e-6)
    with pytest.raises(ValueError, match="num_data=1000 differs from the batch size 10"):
        elbo.loss(inst.model, inst.guide, x, None, num_data=N)
    pyro.set_rng_seed(1)
    svi = pyro.infer.SVI(inst.model, inst.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    scaled = svi.step(x, idx)  # the loss before the step's update
    assert scaled == pytest.approx(N / B * unscaled, rel=1e-5)
    assert "num_data: 'int | None' = 1000" in str(__import__("inspect").signature(inst.model))


def ppca_args(tmp_path, *more):
    return ["fit", str(REPO / "examples/configs/ppca.toml"), "--run-dir", str(tmp_path / "run"), "--num-samples", "4",
            "-o", "data.num_train=200", "-o", "data.num_test=50", "--no-progress", *more]


def test_a_run_that_trained_zero_steps_writes_no_metrics_and_says_so(tmp_path, capsys, monkeypatch):
    from ppl_models.infer.engine import Trainer

    monkeypatch.setattr(Trainer, "_done", lambda self: True)  # the budget spent before the first step
    assert cli_main(ppca_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "trained 0 steps" in err[-1] and "no metrics.json" in err[-1]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_svi_inner_refuses_several_processes_and_says_the_fast_path_is_off(tmp_path, capsys, shared_data):
    """The README's ``ppl-models fit examples/configs/inference_strategies.toml -o train.strategy=svi-inner``:
    with ``--nproc 2`` one error before any process starts; with ``fast_path = true`` the notice that it is off."""
    argv = ["fit", str(REPO / "examples/configs/inference_strategies.toml"), "-o", "train.strategy=svi-inner",
            "--run-dir", str(tmp_path / "run"), "-o", "data.limit_train=32", "-o", "model.hidden_dims=[16]",
            "-o", "model.z_dim=2", "-o", "train.batch_size=16", "-o", "train.inner_steps=2", "--no-progress"]
    assert cli_main([*argv, "--nproc", "2"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: [train] strategy 'svi-inner' cannot run in several processes"), line
    assert not (tmp_path / "run").exists()
    assert cli_main([*argv, "-o", "train.fast_path=true", "-o", "train.max_steps=2", "--no-evaluate"]) == 0
    err = capsys.readouterr().err
    assert "fast path off: the guide optimizes λ for each batch inside the step" in err
    assert json.loads((tmp_path / "run" / "train.json").read_text())["fast_path"].startswith("off: the guide optimizes")


def test_packaging_license_typed_marker_and_installed_configs():
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0, January 2004" in (REPO / "LICENSE").read_text()
    assert "END OF TERMS AND CONDITIONS" in (REPO / "LICENSE").read_text()
    setup = (REPO / "setup.cfg").read_text()
    assert "license = Apache-2.0" in setup and "license_files = LICENSE" in setup
    assert (REPO / "ppl_models" / "py.typed").is_file() and "ppl_models = py.typed" in setup
    for dependency in ("pooch", "sacrebleu", "tomli-w"):  # each with its line in the README's dependency list
        assert f"    {dependency}>=" in setup and f"- `{dependency}`" in (REPO / "README.md").read_text()
    # no shipped config names a file that the wheel does not install
    for path in (REPO / "examples" / "configs").glob("*.toml"):
        module = tomllib.loads(path.read_text()).get("model", {}).get("module")
        assert module is None or not module.endswith(".py"), (path.name, module)


def test_importing_the_arviz_adapter_leaves_the_warning_filters_alone():
    code = ("import warnings, numpy, torch, pyro, arviz\n"  # their own filters are theirs
            "before = list(warnings.filters)\nimport ppl_models.infer.diagnostics\n"
            "assert warnings.filters == before, [f for f in warnings.filters if f not in before]")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
