"""The training engine: resume, signals, non-finite losses, sparse updates, names."""

import os
import signal

import pyro
import pytest
import torch

import ppl_models as pm
from ppl_models.data import DynamicBinarized
from ppl_models.infer import NonFiniteLossError, Trainer, TrainingInterrupted
from ppl_models.infer.checkpoint import list_checkpoints, load_checkpoint
from ppl_models.registry import UnknownNameError

NUM_DATA = 200
SMALL_VAE = {"z_dim": 3, "hidden_dims": [16], "x_dim": 20}
SMALL_GUIDE = {"amortized": {"hidden_dims": [16]}, "mean-field": {}}


def simulated_pixels(num_data=NUM_DATA, x_dim=20, seed=0):
    """Pixel probabilities drawn from the VAE itself (a random decoder)."""
    torch.manual_seed(seed)
    decoder = pm.vae.Decoder(3, (16,), x_dim)
    with torch.no_grad():
        return torch.sigmoid(decoder(torch.randn(num_data, 3)))


def make_trainer(run_dir, guide="amortized", seed=0, **kwargs):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    inst = pm.instantiate("vae", guide, num_data=NUM_DATA, model_kwargs=SMALL_VAE, guide_kwargs=SMALL_GUIDE[guide])
    data = DynamicBinarized(simulated_pixels())
    defaults = dict(batch_size=64, num_epochs=3, lr=1e-2, seed=seed, run_dir=run_dir, progress=False)
    defaults.update(kwargs)
    return Trainer(inst.model, inst.guide, data, **defaults)


def params_now():
    return {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}


def assert_same_params(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("guide", ["amortized", "mean-field"])
def test_resume_after_epoch_is_bit_identical(tmp_path, guide):
    make_trainer(tmp_path / "full", guide).fit()
    full = params_now()

    make_trainer(tmp_path / "split", guide, num_epochs=1).fit()
    trainer = make_trainer(tmp_path / "split", guide, seed=0)
    torch.manual_seed(123)  # resume must not depend on the generators' state before it
    result = trainer.fit(resume=True)
    assert result.epoch == 3
    assert_same_params(params_now(), full)


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    make_trainer(tmp_path / "full", "mean-field").fit()
    full = params_now()
    make_trainer(tmp_path / "split", "mean-field", max_steps=5).fit()  # 4 batches per epoch: stops mid-epoch 2
    assert load_checkpoint(list_checkpoints(tmp_path / "split" / "checkpoints")[-1])["batch_in_epoch"] == 1
    make_trainer(tmp_path / "split", "mean-field").fit(resume=True)
    assert_same_params(params_now(), full)


def test_sigterm_mid_epoch_checkpoints_and_keeps_previous(tmp_path):
    make_trainer(tmp_path / "full").fit()
    full = params_now()

    def send_sigterm(trainer, step, loss):
        if step == 6:  # epoch 2, batch 2
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = make_trainer(tmp_path / "run", callback=send_sigterm)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.signum == signal.SIGTERM and info.value.step == 6
    files = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [f.name for f in files] == ["step-000000004.pt", "step-000000006.pt"]
    previous, latest = (load_checkpoint(f) for f in files)
    assert (previous["epoch"], previous["batch_in_epoch"]) == (1, 0)
    assert (latest["epoch"], latest["batch_in_epoch"]) == (1, 2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    make_trainer(tmp_path / "run").fit(resume=True)
    assert_same_params(params_now(), full)


def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path):
    make_trainer(tmp_path / "run", num_epochs=2).fit()
    files = list_checkpoints(tmp_path / "run" / "checkpoints")
    files[-1].write_bytes(files[-1].read_bytes()[:100])  # truncated
    trainer = make_trainer(tmp_path / "run", num_epochs=2)
    assert trainer.resume() == files[0]
    assert trainer.epoch == 1


def test_resume_with_other_settings_is_refused(tmp_path):
    make_trainer(tmp_path / "run", num_epochs=1).fit()
    with pytest.raises(Exception, match="setting 'lr' was 0.01 in the checkpoint, received 0.001"):
        make_trainer(tmp_path / "run", lr=1e-3).fit(resume=True)


def test_non_finite_loss_names_step_site_and_parameter_and_keeps_checkpoint(tmp_path):
    good = {}

    def poison(trainer, step, loss):
        if step == 4:  # the epoch-1 checkpoint's parameters (4 steps per epoch)
            good["weight"] = pyro.get_param_store()["decoder$$$net.0.weight"].detach().clone()
        if step == 5:  # after the epoch-1 checkpoint
            with torch.no_grad():
                pyro.get_param_store()["decoder$$$net.0.weight"].fill_(float("nan"))

    trainer = make_trainer(tmp_path / "run", callback=poison)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "at step 6" in message
    assert "site 'x' (model)" in message
    assert "decoder$$$net.0.weight" in message
    assert info.value.step == 6 and info.value.site == "x"
    files = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [f.name for f in files] == ["step-000000004.pt"]
    assert torch.equal(load_checkpoint(files[0])["params"]["decoder$$$net.0.weight"], good["weight"])


def test_per_datapoint_step_moves_only_the_batch_rows():
    trainer = make_trainer(None, "mean-field", num_epochs=1, max_steps=1, batch_size=32)
    trainer._setup()
    table = pyro.get_param_store()["local_params$$$tables.z.weight"]
    before = table.detach().clone()
    trainer.fit()
    idx = trainer.perm[:32] if trainer.perm is not None else None
    assert idx is not None
    changed = (table.detach() != before).any(-1)
    assert changed[idx].all()
    changed[idx] = False
    assert not changed.any()
    assert type(trainer._optim.optimizers["sparse"]).__name__ == "SparseAdam"


@pytest.mark.parametrize(
    "kwargs, kind, bad",
    [({"elbo": "Trace_ELBOO"}, "estimator", "Trace_ELBOO"), ({"optimizer": "adamm"}, "optimizer", "adamm")],
)
def test_unknown_names_list_the_valid_ones(kwargs, kind, bad):
    with pytest.raises(UnknownNameError) as info:
        make_trainer(None, **kwargs)
    assert f"unknown {kind} {bad!r}" in str(info.value)
    assert "valid" in str(info.value)


def test_unknown_model_guide_and_hyperparameter():
    with pytest.raises(UnknownNameError, match="unknown model 'vea'; valid models: .*vae"):
        pm.instantiate("vea", "amortized", num_data=10)
    with pytest.raises(UnknownNameError, match="unknown guide for model 'vae' 'amortised'; valid .*amortized"):
        pm.instantiate("vae", "amortised", num_data=10)
    with pytest.raises(UnknownNameError, match="unknown model 'vae' hyperparameter 'zdim'; valid .*z_dim"):
        pm.instantiate("vae", "amortized", num_data=10, model_kwargs={"zdim": 3})


def test_the_vae_activation_is_relu_or_tanh():
    inst = pm.instantiate("vae", "amortized", num_data=10, model_kwargs={**SMALL_VAE, "activation": "tanh"},
                          guide_kwargs={"hidden_dims": [16], "activation": "tanh"})
    kinds = {type(m).__name__ for name in ("decoder", "encoder") for m in inst.modules[name].modules()}
    assert "Tanh" in kinds and "ReLU" not in kinds
    with pytest.raises(ValueError, match=r"activation: expected one of \['relu', 'tanh'\], received 'gelu'"):
        pm.instantiate("vae", "amortized", num_data=10, model_kwargs={**SMALL_VAE, "activation": "gelu"})


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.full((4, 20), float("nan")), r"site 'x': expected finite values, received nan at index \(0, 0\)"),
        (torch.rand(4, 28, 28), r"site 'x': expected shape \(batch, 20\), received \(4, 28, 28\)"),
        (torch.rand(4, 20) * 255, r"site 'x': expected values in \[0, 1\], received"),
        (torch.ones(4, 20, dtype=torch.long), "site 'x': expected a floating-point tensor, received dtype torch.int64"),
    ],
)
def test_bad_pixels_get_one_clear_error(x, message):
    inst = pm.instantiate("vae", "amortized", num_data=None, model_kwargs=SMALL_VAE, guide_kwargs={"hidden_dims": [16]})
    with pytest.raises(pm.ShapeError, match=message):
        pyro.infer.Trace_ELBO().loss(inst.model, inst.guide, x)
