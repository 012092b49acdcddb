"""The engine's optimizers (ppl_models.infer.optim): the direct fused-Adam step is torch's fused Adam, bitwise."""

from __future__ import annotations

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
def test_direct_fused_step_equals_torchs_fused_adam_bitwise(name, kwargs):
    got, opt = run(6, True, name, **kwargs)
    ref, ref_opt = run(6, False, name, **kwargs)
    assert opt._fused_step is not None and opt._fused_step._key is not None  # the direct kernel ran
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    state = opt.state_dict()["dense"]["state"]
    ref_state = ref_opt.state_dict()["dense"]["state"]
    for i in state:
        assert float(state[i]["step"]) == float(ref_state[i]["step"]) == 6.0
        assert torch.equal(state[i]["exp_avg_sq"], ref_state[i]["exp_avg_sq"])


def test_direct_fused_step_survives_a_state_reload():
    got, _ = run(6, True, reload_at=3)
    ref, _ = run(6, False)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_amsgrad_and_missing_gradients_use_torchs_step():
    _, opt = run(3, True, amsgrad=True)
    assert opt._fused_step._key is None
