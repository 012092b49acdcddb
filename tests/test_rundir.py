"""Fault injection on run directories (issue 17, cases 1-9): each test breaks a run directory the way a user's
machine or a user does, and checks that no work is lost and that the error is one clear line.

Tiny runs: factor analysis on 200 simulated rows (examples/ppca.py), batches of 50 (4 steps an epoch), budgets in
steps; with ``max_steps = 6`` a run writes checkpoints at step 4 (end of epoch 1) and step 6 (the budget).
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

import ppl_models as pm
from ppl_models.app.cli import main
from ppl_models.data import TensorDataset
from ppl_models.infer import NonFiniteLossError, Trainer, TrainingInterrupted
from ppl_models.infer.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from ppl_models.spec import ShapeError

REPO = Path(__file__).resolve().parents[1]
PPCA = REPO / "examples" / "configs" / "ppca.toml"
TINY = ["-o", "data.num_train=200", "-o", "data.num_test=20", "-o", "train.batch_size=50",
        "-o", "evaluate.num_samples=4", "-o", "output.plots=false", "-o", f'model.module="{REPO / "examples" / "ppca.py"}"',
        "--no-progress"]
STEPS = ["-o", "train.max_steps=6"]
CKPT_4, CKPT_6 = "step-000000004.pt", "step-000000006.pt"


def fit(run_dir, *extra) -> int:
    return main(["fit", str(PPCA), "--run-dir", str(run_dir), *TINY, *extra])


def snapshot(folder: Path) -> dict:
    """Every file below ``folder`` and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    """stderr of the command that just ran: exactly one line ``error: ...`` (no traceback, no notes)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished tiny run (checkpoints at steps 4 and 6, metrics.json); tests work on copies (:func:`copy_run`)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert fit(run, *STEPS) == 0
    assert sorted(p.name for p in list_checkpoints(run / "checkpoints")) == [CKPT_4, CKPT_6]
    return run


def copy_run(trained_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


# ------------------------------------------------------------------------------------------ the engine's runs
def vae_trainer(run_dir, x=None, **kwargs) -> Trainer:
    """A VAE (z 3, hidden 16, 20 pixels) on 200 binary rows: 4 steps an epoch with batches of 50."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    if x is None:
        x = torch.bernoulli(torch.full((200, 20), 0.3))
    inst = pm.instantiate("vae", "amortized", num_data=x.shape[0], model_kwargs={"z_dim": 3, "hidden_dims": [16], "x_dim": 20},
                          guide_kwargs={"hidden_dims": [16]})
    vae_trainer.spec = inst.spec
    options = dict(batch_size=50, num_epochs=3, lr=1e-2, seed=0, run_dir=run_dir, progress=False, fast_path=False)
    options.update(kwargs)
    return Trainer(inst.model, inst.guide, TensorDataset(x), **options)


def training_must_not_start(trainer, *args):
    raise AssertionError("a training step ran")


def names(run_dir) -> list:
    return [p.name for p in list_checkpoints(Path(run_dir) / "checkpoints")]


# ---------------------------------------------------------------------------------------------------- case 1
def test_case1_negative_keep_last_is_refused_and_zero_keeps_all(tmp_path, capsys):
    """keep_last = -1 used to delete every checkpoint, the one just written included, with exit status 0."""
    assert fit(tmp_path / "run", *STEPS, "-o", "train.keep_last=-1") == 2
    assert "keep_last" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="keep_last: expected an integer >= 1 .* or 0 \\(keep all\\), received -1"):
        vae_trainer(tmp_path / "engine", keep_last=-1)

    vae_trainer(tmp_path / "all", keep_last=0).fit()  # 0: every checkpoint stays
    assert names(tmp_path / "all") == ["step-000000004.pt", "step-000000008.pt", "step-000000012.pt"]
    result = vae_trainer(tmp_path / "one", keep_last=1).fit()
    assert names(tmp_path / "one") == ["step-000000012.pt"] and result.checkpoint.name == "step-000000012.pt"


# ---------------------------------------------------------------------------------------------------- case 2
@pytest.mark.parametrize("damage", ["stopped before the first checkpoint", "every checkpoint truncated"])
def test_case2_resume_without_a_readable_checkpoint_is_refused(trained_run, tmp_path, capsys, damage):
    """--resume used to train from scratch (without re-seeding) over such a run, exit status 0."""
    run = copy_run(trained_run, tmp_path)
    if damage == "stopped before the first checkpoint":
        shutil.rmtree(run / "checkpoints")
        (run / "metrics.json").unlink()
    else:
        for path in list_checkpoints(run / "checkpoints"):
            path.write_bytes(path.read_bytes()[:100])
    before = snapshot(run)
    capsys.readouterr()
    assert fit(run, "-o", "train.max_steps=10", "--resume") == 2
    error = one_error_line(capsys)
    assert "cannot resume" in error and "no readable checkpoint" in error
    if damage == "stopped before the first checkpoint":
        assert f"{run / 'checkpoints'} does not exist" in error
    else:  # each file is named with its reason
        assert f"{CKPT_4} cannot be read" in error and f"{CKPT_6} cannot be read" in error
    assert snapshot(run) == before  # nothing overwritten

    with pytest.raises(CheckpointError, match="cannot resume: no readable checkpoint: .* does not exist"):
        vae_trainer(tmp_path / "empty").fit(resume=True)  # the engine alone refuses as well


# ---------------------------------------------------------------------------------------------------- case 3
def test_case3_rotation_follows_the_runs_own_history(tmp_path):
    """Rotation by step number deleted a SIGINT checkpoint (step 6) at once when the directory held higher steps
    (here planted by another program during the run): rotation now deletes only checkpoints this run wrote."""
    vae_trainer(tmp_path / "older", num_epochs=2).fit()
    older = {p.name: p.read_bytes() for p in list_checkpoints(tmp_path / "older" / "checkpoints")}  # steps 4 and 8
    planted = {"step-000000500.pt": older["step-000000004.pt"], "step-000001000.pt": older["step-000000008.pt"]}

    def plant_then_interrupt(trainer, step, loss):
        if step == 2:
            (tmp_path / "run" / "checkpoints").mkdir(parents=True, exist_ok=True)
            for name, data in planted.items():
                (tmp_path / "run" / "checkpoints" / name).write_bytes(data)
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    trainer = vae_trainer(tmp_path / "run", callback=plant_then_interrupt, keep_last=2)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.checkpoint.name == "step-000000006.pt" and info.value.checkpoint.is_file()
    # the run's own two newest (4 at the end of epoch 1, then 6) are kept; the planted files are not touched
    assert names(tmp_path / "run") == ["step-000000004.pt", "step-000000006.pt", *planted]
    for name, data in planted.items():
        assert (tmp_path / "run" / "checkpoints" / name).read_bytes() == data
    assert load_checkpoint(info.value.checkpoint)["checkpoints"] == ["step-000000004.pt", "step-000000006.pt"]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["step"] == [4]  # this run's history, written with its checkpoint


def test_case3_fit_refuses_a_directory_holding_an_earlier_runs_checkpoints(trained_run, tmp_path, capsys):
    """A second plain fit into a finished run's directory used to train from scratch among the old checkpoints."""
    run = copy_run(trained_run, tmp_path)
    before = snapshot(run)
    capsys.readouterr()
    assert fit(run, *STEPS) == 2
    error = one_error_line(capsys)
    assert f"already holds a run (checkpoints up to {CKPT_6})" in error and "--resume" in error
    assert snapshot(run) == before
    with pytest.raises(CheckpointError, match="already holds checkpoints of an earlier training"):
        vae_trainer(run).fit()  # the engine alone never mixes two trainings' checkpoints either
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------------- case 4
def test_case4_refused_resume_rewrites_nothing_and_names_each_difference(trained_run, tmp_path, capsys):
    """A refused --resume used to rewrite config.toml first, after which the run directory no longer evaluated."""
    run = copy_run(trained_run, tmp_path)
    before = snapshot(run)
    capsys.readouterr()
    assert fit(run, "-o", "train.max_steps=10", "-o", "data.num_train=100", "-o", "train.lr=0.02", "--resume") == 2
    error = one_error_line(capsys)
    assert "cannot resume" in error and "configuration differs" in error
    assert "data.num_train: 200 in the run, 100 now" in error and "train.lr: 0.01 in the run, 0.02 now" in error
    assert snapshot(run) == before
    assert main(["evaluate", str(run), "--no-progress"]) == 0  # the run directory still evaluates
    assert json.loads((run / "metrics.json").read_text())["num_data"] == 20

    # budgets are not the run's identity: a longer budget continues it
    assert fit(run, "-o", "train.max_steps=10", "--resume") == 0
    assert names(run) == ["step-000000008.pt", "step-000000010.pt"]


@pytest.mark.parametrize("override", ["model.z_dmi=2", 'guide.name="nope"', "guide.hidden_dimz=[8]",
                                      "data.num_trian=5", "model.x_dim=6"])
def test_case4_configs_failing_after_parsing_leave_no_run_directory(tmp_path, capsys, override):
    """Configs that parse but fail when the data, model or guide is built or first run (x_dim 6 against 5-dimensional
    data) used to leave a config.toml behind."""
    assert fit(tmp_path / "run", *STEPS, "-o", override) == 2
    one_error_line(capsys)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------- case 5
def test_case5_an_empty_run_dir_and_a_users_own_files_are_refused(tmp_path, capsys, monkeypatch):
    """run_dir = "" used the current directory and overwrote the input config.toml; a directory holding the user's
    own config.toml, metrics.json and history.json (no checkpoints) was silently overwritten."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "config.toml").write_text(PPCA.read_text())
    monkeypatch.chdir(cwd)
    before = snapshot(cwd)
    assert main(["fit", "config.toml", *TINY, *STEPS, "-o", 'output.run_dir=""']) == 2
    assert "run_dir" in one_error_line(capsys)
    assert snapshot(cwd) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    for name, text in (("config.toml", "# my notes\n"), ("metrics.json", '{"mine": 1}\n'), ("history.json", "[]\n")):
        (mine / name).write_text(text)
    before = snapshot(mine)
    assert fit(mine, *STEPS) == 2
    error = one_error_line(capsys)
    assert "config.toml, history.json, metrics.json" in error and "not a ppl_models run directory" in error
    assert snapshot(mine) == before


# ---------------------------------------------------------------------------------------------------- case 6
def test_case6_a_second_process_on_a_run_directory_gets_one_clear_error(tmp_path, monkeypatch):
    """Two fit processes on one run directory both used to finish with status 0, the second overwriting the first
    (config.toml saying seed 1 beside seed 0's metrics).  Here the first (this process) pauses as its training
    starts, holding the run directory, while a second process runs the same command with another seed."""
    run = tmp_path / "run"
    second = {}
    real_fit = Trainer.fit

    def start_second_process_first(self, resume=False):
        if not second:
            cmd = [sys.executable, "-m", "ppl_models", "fit", str(PPCA), "--run-dir", str(run), *TINY, *STEPS,
                   "--seed", "1"]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            second["proc"] = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        return real_fit(self, resume)

    monkeypatch.setattr(Trainer, "fit", start_second_process_first)
    assert fit(run, *STEPS) == 0
    proc = second["proc"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "in use by another process" in line and f"pid {os.getpid()}" in line
    assert "seed = 0" in (run / "config.toml").read_text()
    assert load_checkpoint(run / "checkpoints" / CKPT_6)["settings"]["seed"] == 0
    assert json.loads((run / "metrics.json").read_text())["checkpoint_step"] == 6


# ---------------------------------------------------------------------------------------------------- case 7
@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: the folder and its sub-folders lose write permission.  Not running as root, by chmod;
    as root (which permissions do not bind) by refusing, as the kernel then would, every call of this process that
    creates, removes or renames an entry below the folder (opening an existing file for writing stays allowed)."""
    chmodded = []

    def make(folder: Path):
        folders = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
        if os.geteuid() != 0:
            for d in folders:
                d.chmod(0o555)
                chmodded.append(d)
            return
        root = folder.resolve()

        def below(path) -> bool:
            if isinstance(path, int):
                return False
            try:
                return Path(os.fsdecode(path)).resolve().is_relative_to(root)
            except (TypeError, ValueError):
                return False

        def deny(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

        def guard(real, creates=lambda *a, **k: True):
            def call(path, *args, **kwargs):
                if below(path) and creates(path, *args, **kwargs):
                    deny(path)
                return real(path, *args, **kwargs)
            return call

        new_entry = lambda path, *a, **k: not os.path.lexists(path)  # noqa: E731
        open_creates = lambda path, mode="r", *a, **k: any(c in mode for c in "wax") and new_entry(path)  # noqa: E731
        os_open_creates = lambda path, flags, *a, **k: bool(flags & os.O_CREAT) and new_entry(path)  # noqa: E731
        monkeypatch.setattr(builtins, "open", guard(builtins.open, open_creates))
        monkeypatch.setattr(io, "open", guard(io.open, open_creates))
        monkeypatch.setattr(os, "open", guard(os.open, os_open_creates))
        monkeypatch.setattr(os, "mkdir", guard(os.mkdir, new_entry))
        for name in ("unlink", "remove", "rmdir"):
            monkeypatch.setattr(os, name, guard(getattr(os, name), lambda path, *a, **k: os.path.lexists(path)))
        for name in ("rename", "replace"):  # either end below the folder
            real = getattr(os, name)
            monkeypatch.setattr(os, name, lambda src, dst, *a, _real=real, **k: deny(src) if below(src) or below(dst)
                                else _real(src, dst, *a, **k))

    yield make
    for d in chmodded:
        d.chmod(0o755)


def test_case7_a_read_only_run_directory_is_one_clear_error_before_any_work(trained_run, tmp_path, capsys,
                                                                            monkeypatch, read_only):
    """A read-only run directory used to give a raw OSError traceback (masked by a second one from the clean-up),
    and evaluate failed only after the whole evaluation."""
    import ppl_models.infer.evaluate as evaluate_module

    run = copy_run(trained_run, tmp_path)
    evaluations = []
    real = evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: evaluations.append(1) or real(*a, **k))
    monkeypatch.setattr(Trainer, "train_step", training_must_not_start)
    before = snapshot(run)
    read_only(run)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-progress"]) == 2
    error = one_error_line(capsys)
    assert f"run directory {run} is not writable" in error
    assert fit(run, "-o", "train.max_steps=10", "--resume") == 2
    assert "is not writable" in one_error_line(capsys)
    assert evaluations == []  # refused before any work
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------------- case 8
def test_case8_evaluate_refuses_a_damaged_newest_checkpoint_and_records_the_step(trained_run, tmp_path, capsys):
    """evaluate used to evaluate an older checkpoint when the newest was truncated (exit 0), and metrics.json did not
    say which checkpoint it described."""
    run = copy_run(trained_run, tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["checkpoint"], metrics["checkpoint_step"]) == (f"checkpoints/{CKPT_6}", 6)  # written by fit
    newest = run / "checkpoints" / CKPT_6
    newest.write_bytes(newest.read_bytes()[:100])
    before = snapshot(run)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-progress"]) == 2
    error = one_error_line(capsys)
    assert "newest checkpoint is damaged" in error and CKPT_6 in error and "--checkpoint" in error and CKPT_4 in error
    assert snapshot(run) == before
    assert main(["evaluate", str(run), "--checkpoint", CKPT_4, "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["checkpoint"], metrics["checkpoint_step"]) == (f"checkpoints/{CKPT_4}", 4)


def test_case8_a_checkpoint_missing_keys_is_one_clear_error(trained_run, tmp_path, capsys):
    """A checkpoint in the right format without some of the engine's keys used to give KeyError: 'settings'."""
    run = copy_run(trained_run, tmp_path)
    newest = run / "checkpoints" / CKPT_6
    state = torch.load(newest, weights_only=True)
    del state["settings"], state["params"]
    torch.save(state, newest)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-progress"]) == 2
    assert "missing the key(s) 'settings', 'params'" in one_error_line(capsys)
    with pytest.raises(CheckpointError, match=r"missing the key\(s\) 'settings', 'params'"):
        load_checkpoint(newest)


def test_case8_orphaned_temporary_files_are_removed_on_the_next_start(trained_run, tmp_path):
    """A write interrupted by kill -9 used to leave its .<name>.tmp-<pid> file forever."""
    run = copy_run(trained_run, tmp_path)
    orphans = [run / "checkpoints" / ".step-000000008.pt.tmp-4242", run / ".metrics.json.tmp-4242"]
    for path in orphans:
        path.write_bytes(b"half a file")
    assert main(["evaluate", str(run), "--no-progress"]) == 0
    assert not any(path.exists() for path in orphans)
    for path in orphans:
        path.write_bytes(b"half a file")
    assert fit(run, "-o", "train.max_steps=8", "--resume") == 0
    assert not any(path.exists() for path in orphans)


# ---------------------------------------------------------------------------------------------------- case 9
@pytest.mark.parametrize("override, named", [
    ("evaluate.num_samples=0", "num_samples"), ("evaluate.batch_size=0", "batch_size"),
    ('evaluate.split="nope"', "split 'nope'"), ("train.lr=inf", "lr"), ("train.max_steps=-1", "max_steps"),
    ("train.time_limit=-5", "time_limit")])
def test_case9_config_values_are_checked_before_anything_is_written(tmp_path, capsys, monkeypatch, override, named):
    """These values used to be rejected only after training, or never (-1 steps, -5 s: 0 steps, then the untrained
    model evaluated with exit status 0)."""
    monkeypatch.setattr(Trainer, "train_step", training_must_not_start)
    assert fit(tmp_path / "run", *STEPS, "-o", override) == 2
    assert named in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_case9_evaluate_options_are_checked_and_one_sample_works(trained_run, tmp_path, capsys):
    """ppl-models evaluate --num-samples 0 used to be silently ignored; num_samples = 1 raised in the k-hat step."""
    run = copy_run(trained_run, tmp_path)
    before = snapshot(run)
    for flags, named in ((["--num-samples", "0"], "num_samples"), (["--batch-size", "0"], "batch_size"),
                         (["--split", "nope"], "split 'nope'")):
        capsys.readouterr()
        assert main(["evaluate", str(run), *flags, "--no-progress"]) == 2
        assert named in one_error_line(capsys)
    assert snapshot(run) == before
    assert main(["evaluate", str(run), "--num-samples", "1", "--no-progress"]) == 0
    assert "note: pareto_khat skipped" in capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_samples"] == 1 and metrics["pareto_khat_frac_undetermined"] == 1.0
    assert metrics["log_likelihood"] == pytest.approx(metrics["elbo"], abs=1e-9)  # K = 1: IWAE is the ELBO


@pytest.mark.parametrize("fast_path", [False, "auto"])
def test_case9_nan_in_the_data_is_reported_with_its_dataset_row(tmp_path, fast_path):
    """A NaN used to be reported with its row within the batch (< 50 here), not its row in the data set (137)."""
    x = torch.bernoulli(torch.full((200, 20), 0.3))
    x[137, 5] = float("nan")
    with pytest.raises((ShapeError, NonFiniteLossError), match=r"training data row\(s\) with non-finite values: 137\b"):
        vae_trainer(tmp_path / "run", x, fast_path=fast_path).fit()
    from ppl_models.infer.evaluate import evaluate

    trainer = vae_trainer(None, x[:100], num_epochs=1)
    trainer.fit()
    with pytest.raises(ShapeError, match=r"evaluated data row\(s\) with non-finite values: 137\b"):
        evaluate(trainer.model, trainer.guide, TensorDataset(x), spec=vae_trainer.spec, num_samples=2, batch_size=50,
                 progress=False)
