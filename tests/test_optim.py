"""The engine's optimizers (ppl_models.infer.optim): the direct fused-Adam step is torch's fused Adam, bitwise."""

from __future__ import annotations

import functools

import pytest
import torch

from ppl_models.infer.optim import make_optimizer


def run(steps: int, direct: bool, name: str = "adam", reload_at=None, **kwargs):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(7, 5, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]
    opt = make_optimizer(name, [("w", params[0]), ("b", params[1])], lr=0.05, **kwargs)
    if not direct:
        opt._fused_step = None  # torch's own Adam.step every time
    for step in range(steps):
        if reload_at == step:  # a checkpoint round trip replaces the state tensors
            opt.load_state_dict(opt.state_dict())
        opt.zero_grad()
        loss = (params[0].sin().sum(0) * params[1]).pow(2).sum() + step * params[1].sum()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("name,kwargs", [("adam", {}), ("adam", {"weight_decay": 0.1}), ("adamw", {})])
def test_direct_fused_step_equals_torchs_fused_adam_bitwise(name, kwargs, monkeypatch):
    torch_steps = []
    for cls in (torch.optim.Adam, torch.optim.AdamW):  # count torch's own steps (AdamW may inherit Adam's)
        if "step" in vars(cls):
            monkeypatch.setattr(cls, "step", functools.partialmethod(counted, cls.step, torch_steps))
    got, opt = run(6, True, name, **kwargs)
    assert len(torch_steps) == 1  # torch's step once, creating the state; the other five the direct kernel's
    ref, ref_opt = run(6, False, name, **kwargs)
    assert len(torch_steps) == 1 + 6
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    state = opt.state_dict()["dense"]["state"]
    ref_state = ref_opt.state_dict()["dense"]["state"]
    for i in state:
        assert float(state[i]["step"]) == float(ref_state[i]["step"]) == 6.0
        assert torch.equal(state[i]["exp_avg_sq"], ref_state[i]["exp_avg_sq"])


def counted(self, step, calls, *args, **kwargs):
    calls.append(type(self).__name__)
    return step(self, *args, **kwargs)


def test_direct_fused_step_survives_a_state_reload():
    got, _ = run(6, True, reload_at=3)
    ref, _ = run(6, False)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_amsgrad_and_missing_gradients_use_torchs_step():
    # AMSGrad, which the direct kernel does not do: torch's own AMSGrad step, bitwise, and not plain Adam's.
    got, opt = run(6, True, amsgrad=True)
    ref, _ = run(6, False, amsgrad=True)
    plain, _ = run(6, False)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert not torch.equal(got[1], plain[1])
    assert all("max_exp_avg_sq" in s for s in opt.state_dict()["dense"]["state"].values())
    # A step where one parameter has no gradient: as torch's fused Adam, that parameter and its state unchanged.
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(7, 5, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = make_optimizer("adam", [("w", params[0]), ("b", params[1])], lr=0.05)
    torch_adam = torch.optim.Adam(twins, lr=0.05, fused=True)
    for step in range(5):
        for o, (w, b) in ((opt, params), (torch_adam, twins)):
            o.zero_grad()
            loss = w.pow(2).sum() if step == 3 else (w.sin().sum(0) * b).pow(2).sum()  # step 3: no gradient for b
            loss.backward()
            o.step()
        if step == 3:
            assert params[1].grad is None
    for a, b in zip(params, twins):
        assert torch.equal(a, b)
    steps = [float(s["step"]) for s in opt.state_dict()["dense"]["state"].values()]
    assert steps == [float(s["step"]) for s in torch_adam.state_dict()["state"].values()] == [5.0, 4.0]
