"""What the conditional VAE task needs beyond its model (:mod:`ppl_models.cvae`): the trained baseline.

The CVAE builds on a trained deterministic baseline (``cvae-baseline``) held fixed.  A run names the baseline's
run directory (``[model] baseline_run``, and ``baseline_hidden_dims``, the sizes it was trained with); the task
interface's :func:`build_kwargs` turns them into the network :func:`ppl_models.cvae.build` takes
(``baseline_net``), read by :func:`load_baseline` from that run's newest checkpoint.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

from ppl_models.cvae import BaselineNet, build, build_baseline
from ppl_models.infer.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

__all__ = ["load_baseline", "build_kwargs"]


def load_baseline(run_dir: str, num_quadrant_inputs: int, hidden_dims: Sequence[int], side: int) -> BaselineNet:
    """The baseline network of the newest checkpoint of a ``cvae-baseline`` run directory, held fixed
    (no gradients, evaluation mode); a checkpoint whose parameters do not fit the layout is one error naming both."""
    directory = Path(run_dir) / "checkpoints"
    path = latest_checkpoint(directory) if directory.is_dir() else None
    if path is None:
        raise CheckpointError(
            f"model 'cvae' hyperparameter baseline_run={run_dir!r}: expected a trained 'cvae-baseline' run "
            f"directory, but {directory} holds no checkpoint (train the baseline first, or set baseline_run = \"\")"
        )
    net = BaselineNet(num_quadrant_inputs, hidden_dims, side)
    prefix = "baseline_net$$$"
    state = {k[len(prefix):]: v for k, v in load_checkpoint(path)["params"].items() if k.startswith(prefix)}
    expected = net.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != {k: tuple(v.shape) for k, v in expected.items()}:
        raise CheckpointError(
            f"baseline checkpoint {path}: expected a baseline for {num_quadrant_inputs} observed quadrant(s) with "
            f"hidden_dims={list(hidden_dims)} (parameters {({k: tuple(v.shape) for k, v in expected.items()})}), "
            f"received parameters {shapes}"
        )
    net.load_state_dict(state)
    net.requires_grad_(False)
    return net.eval()


def _default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


def build_kwargs(kwargs: dict) -> dict:
    """The task interface's build hook: ``[model]`` hyperparameters -> :func:`ppl_models.cvae.build`'s keywords.

    ``baseline_run`` (a ``cvae-baseline`` run directory; ``""``: no baseline) and ``baseline_hidden_dims`` (default:
    the baseline's own default) become ``baseline_net`` (:func:`load_baseline`), for the model's
    ``num_quadrant_inputs`` and ``side``; the other hyperparameters pass through unchanged.
    """
    kwargs = dict(kwargs)
    run = kwargs.pop("baseline_run", "")
    hidden_dims = kwargs.pop("baseline_hidden_dims", _default(build_baseline, "hidden_dims"))
    if run:
        num_quadrant_inputs = kwargs.get("num_quadrant_inputs", _default(build, "num_quadrant_inputs"))
        side = kwargs.get("side", _default(build, "side"))
        kwargs["baseline_net"] = load_baseline(run, num_quadrant_inputs, hidden_dims, side)
    return kwargs
