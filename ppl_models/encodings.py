r"""How the data sets encode observations for the models: the conventions both sides read.

The data layer (:mod:`ppl_models.data`) produces these encodings and the models read them; neither may import
the other, so the conventions live here, in the core.

Tokens (:mod:`ppl_models.data.text`, the sentence and latent-alignment models): every vocabulary starts with the
specials :data:`SPECIALS` = ``<pad>``, ``<unk>``, ``<bos>``, ``<eos>`` at the indices :data:`PAD_INDEX` (0),
:data:`UNK_INDEX`, :data:`BOS_INDEX` and :data:`EOS_INDEX`; a batch is ``(batch, T)`` indices padded with
``<pad>`` after each sentence, which ends in ``<eos>``.

Quadrants (:mod:`ppl_models.data.quadrants`, the conditional VAE :mod:`ppl_models.cvae`): a ``side x side``
image is cut into four quadrants; ``num_quadrant_inputs`` (:data:`QUADRANT_INPUTS`) of them are observed and the
others are predicted, as Pyro's ``examples/cvae`` ``MaskImages``.  :func:`missing_mask` marks the predicted
pixels; the observed image ``x_obs`` holds :data:`MASKED` (``-1``) there, and :func:`complete` writes
predictions ``y`` back into it.
"""

from __future__ import annotations

import torch

__all__ = [
    "PAD",
    "UNK",
    "BOS",
    "EOS",
    "SPECIALS",
    "PAD_INDEX",
    "UNK_INDEX",
    "BOS_INDEX",
    "EOS_INDEX",
    "QUADRANT_INPUTS",
    "MASKED",
    "missing_mask",
    "complete",
]

# ------------------------------------------------------------------------------------------------------- tokens
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
#: the special tokens, first in every vocabulary, in index order
SPECIALS = (PAD, UNK, BOS, EOS)
#: their indices
PAD_INDEX, UNK_INDEX, BOS_INDEX, EOS_INDEX = range(len(SPECIALS))

# ---------------------------------------------------------------------------------------------------- quadrants
#: valid numbers of observed (input) quadrants
QUADRANT_INPUTS = (1, 2, 3)
#: the value at the predicted (output) pixels of ``x_obs``
MASKED = -1.0


def missing_mask(num_quadrant_inputs: int, side: int = 28) -> torch.Tensor:
    """Boolean mask of the output pixels, shape ``(side * side,)`` (row-major), as Pyro's ``MaskImages``:

    * 1 input quadrant: the bottom-left one; output: the other three;
    * 2 input quadrants: the left half; output: the right half;
    * 3 input quadrants: all but the bottom-right one; output: the bottom-right quadrant.
    """
    if isinstance(num_quadrant_inputs, bool) or num_quadrant_inputs not in QUADRANT_INPUTS:
        raise ValueError(f"num_quadrant_inputs: expected 1, 2 or 3, received {num_quadrant_inputs!r}")
    if isinstance(side, bool) or not isinstance(side, int) or side < 2 or side % 2:
        raise ValueError(f"image side: expected an even integer >= 2, received {side!r}")
    h = w = side
    out = torch.ones(h, w, dtype=torch.bool)  # True: an output pixel
    out[h // 2 :, : w // 2] = False  # the bottom-left quadrant is always an input
    if num_quadrant_inputs == 2:
        out[:, : w // 2] = False
    if num_quadrant_inputs == 3:
        out[: h // 2, :] = False
    return out.reshape(-1)


def complete(x_obs: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with ``y`` written into the output pixels of ``x_obs``.

    :param x_obs: shape ``(..., side * side)``.
    :param y: shape ``(..., num_missing)``; leading dims broadcast with ``x_obs``'s.
    :param mask: the :func:`missing_mask`, shape ``(side * side,)``.
    :return: shape ``broadcast(...) + (side * side,)``.
    """
    shape = torch.broadcast_shapes(x_obs.shape[:-1], y.shape[:-1])
    full = x_obs.expand(*shape, x_obs.shape[-1]).clone()
    full[..., mask] = y.expand(*shape, y.shape[-1]).to(full.dtype)
    return full
