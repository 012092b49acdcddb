r"""MNIST image completion from quadrants: the task of Pyro's ``examples/cvae`` (Sohn, Lee & Yan 2015, §5.1).

Each 28x28 image is cut into four 14x14 quadrants.  ``num_quadrant_inputs`` of them are the input
:math:`x_{obs}`, the others are the output :math:`y` to be predicted, exactly as Pyro's ``MaskImages``:

* 1 input quadrant: the bottom-left one; output: the other three (588 pixels);
* 2 input quadrants: the left half; output: the right half (392 pixels);
* 3 input quadrants: all but the bottom-right one; output: the bottom-right quadrant (196 pixels).

Pixels are MNIST grey levels :math:`\text{pixel}/255 \in [0, 1]` (not binarized, as in Pyro's example).
The layout (:func:`~ppl_models.encodings.missing_mask`) and the value ``-1`` at the output pixels are
:mod:`ppl_models.encodings`' (the CVAE reads them too).  A batch is ``(x_obs, y)``:

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
from ppl_models.encodings import MASKED, missing_mask

__all__ = ["split_quadrants", "QuadrantDataset", "quadrant_splits"]


def split_quadrants(images: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x_obs, y)`` from images of shape ``(batch, side * side)`` and a :func:`~ppl_models.encodings.missing_mask`."""
    x_obs = images.masked_fill(mask, MASKED)
    y = images[:, mask]
    return x_obs, y


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
    missing_mask(num_quadrant_inputs)  # a bad number of quadrants fails before MNIST is read
    x_train, x_valid, x_test = train_valid_test_images(valid_size, data_dir, download, caller="quadrant_splits")
    return {
        "train": QuadrantDataset(x_train, num_quadrant_inputs),
        "valid": QuadrantDataset(x_valid, num_quadrant_inputs) if valid_size else None,
        "test": QuadrantDataset(x_test, num_quadrant_inputs),
    }
