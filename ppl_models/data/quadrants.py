r"""MNIST image completion from quadrants: the task of Pyro's ``examples/cvae`` (Sohn, Lee & Yan 2015, §5.1).

Each 28x28 image is cut into four 14x14 quadrants.  ``num_quadrant_inputs`` of them are the input
:math:`x_{obs}`, the others are the output :math:`y` to be predicted, exactly as Pyro's ``MaskImages``:

* 1 input quadrant: the bottom-left one; output: the other three (588 pixels);
* 2 input quadrants: the left half; output: the right half (392 pixels);
* 3 input quadrants: all but the bottom-right one; output: the bottom-right quadrant (196 pixels).

Pixels are MNIST grey levels :math:`\text{pixel}/255 \in [0, 1]` (not binarized, as in Pyro's example).
A batch is ``(x_obs, y)``:

* ``x_obs``: shape ``(batch, side * side)``; the input quadrants' pixels, and ``-1`` at every output
  pixel (Pyro's convention "masked with -1");
* ``y``: shape ``(batch, num_missing)``; the output pixels only, in row-major order of the image
  (Pyro keeps 784 values with ``-1`` at the input pixels and selects the others in the model; the
  selected values are the same).

:func:`quadrant_splits` assembles train / valid / test: train = the first ``60000 - valid_size``
MNIST training images, valid = the last ``valid_size`` (``None`` when 0), test = the 10000 MNIST
test images (Pyro trains on all 60000 and reports the 10000 test images, which it also uses for
early stopping).
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import torch

from ppl_models.data.mnist import train_valid_test_images

__all__ = ["QUADRANT_INPUTS", "missing_mask", "split_quadrants", "complete", "QuadrantDataset", "quadrant_splits"]

#: valid numbers of input quadrants
QUADRANT_INPUTS = (1, 2, 3)
#: the value at the output pixels of ``x_obs``
MASKED = -1.0


def _check_inputs(num_quadrant_inputs, side: int) -> None:
    if isinstance(num_quadrant_inputs, bool) or num_quadrant_inputs not in QUADRANT_INPUTS:
        raise ValueError(f"num_quadrant_inputs: expected 1, 2 or 3, received {num_quadrant_inputs!r}")
    if isinstance(side, bool) or not isinstance(side, int) or side < 2 or side % 2:
        raise ValueError(f"image side: expected an even integer >= 2, received {side!r}")


def missing_mask(num_quadrant_inputs: int, side: int = 28) -> torch.Tensor:
    """Boolean mask of the output pixels, shape ``(side * side,)`` (row-major), as Pyro's ``MaskImages``."""
    _check_inputs(num_quadrant_inputs, side)
    h = w = side
    out = torch.ones(h, w, dtype=torch.bool)  # True: an output pixel
    out[h // 2 :, : w // 2] = False  # the bottom-left quadrant is always an input
    if num_quadrant_inputs == 2:
        out[:, : w // 2] = False
    if num_quadrant_inputs == 3:
        out[: h // 2, :] = False
    return out.reshape(-1)


def split_quadrants(images: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x_obs, y)`` from images of shape ``(batch, side * side)`` and a :func:`missing_mask`."""
    x_obs = images.masked_fill(mask, MASKED)
    y = images[:, mask]
    return x_obs, y


def complete(x_obs: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with ``y`` written into the output pixels of ``x_obs``.

    :param x_obs: shape ``(..., side * side)``.
    :param y: shape ``(..., num_missing)``; leading dims broadcast with ``x_obs``'s.
    :return: shape ``broadcast(...) + (side * side,)``.
    """
    shape = torch.broadcast_shapes(x_obs.shape[:-1], y.shape[:-1])
    full = x_obs.expand(*shape, x_obs.shape[-1]).clone()
    full[..., mask] = y.expand(*shape, y.shape[-1]).to(full.dtype)
    return full


class QuadrantDataset:
    """Images cut into ``(x_obs, y)`` per batch (the engine's :class:`~ppl_models.data.Dataset` protocol).

    :param images: grey levels in [0, 1], shape ``(N, side * side)``.
    :param num_quadrant_inputs: 1, 2 or 3.
    """

    def __init__(self, images: torch.Tensor, num_quadrant_inputs: int):
        if not isinstance(images, torch.Tensor) or images.dim() != 2:
            got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"QuadrantDataset: expected images of shape (N, side * side), received {got}")
        side = int(round(images.shape[1] ** 0.5))
        if side * side != images.shape[1]:
            raise ValueError(f"QuadrantDataset: expected square images, received {images.shape[1]} pixels per row")
        self.images, self.side = images, side
        self.num_quadrant_inputs = num_quadrant_inputs
        self.mask = missing_mask(num_quadrant_inputs, side)
        self.num_data = int(images.shape[0])

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return split_quadrants(self.images[idx], self.mask)

    def __len__(self) -> int:
        return self.num_data

    def __repr__(self) -> str:
        return f"QuadrantDataset(N={self.num_data}, num_quadrant_inputs={self.num_quadrant_inputs})"


def quadrant_splits(
    num_quadrant_inputs: int = 1,
    valid_size: int = 0,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Dict[str, object]:
    """Train / valid / test :class:`QuadrantDataset` of MNIST grey levels (see the module docstring).

    :param num_quadrant_inputs: 1, 2 or 3 observed quadrants.
    :param valid_size: training images held out for validation (0: none, ``"valid"`` is ``None``).
    :returns: ``{"train": ..., "valid": ... or None, "test": ...}``; each batch is ``(x_obs, y)``.
    """
    _check_inputs(num_quadrant_inputs, 28)
    x_train, x_valid, x_test = train_valid_test_images(valid_size, data_dir, download, caller="quadrant_splits")
    return {
        "train": QuadrantDataset(x_train, num_quadrant_inputs),
        "valid": QuadrantDataset(x_valid, num_quadrant_inputs) if valid_size else None,
        "test": QuadrantDataset(x_test, num_quadrant_inputs),
    }
