r"""Guides for the HMM alignment model :mod:`ppl_models.hmm_align` (model ``"hmm-align"``).

``enumerate`` — the collapsed model: an empty guide that only opens the sentence plate.  The model marks every
state :math:`a_j` of its chain for parallel enumeration under :func:`pyro.markov`, so
``TraceEnum_ELBO(max_plate_nesting=1)`` sums them out (the forward algorithm) and its "ELBO" is the exact
log-likelihood :math:`\sum_n \log p(f^{(n)} \mid e^{(n)})`.
"""

from __future__ import annotations

import torch

from ppl_models.registry import register_guide
from ppl_models.spec import ModelSpec, data_plate

__all__ = ["enumerate_guide", "build_enumerate"]


def enumerate_guide(src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor, tgt_lengths: torch.Tensor,
                    idx: torch.Tensor | None = None, *, num_data: int | None = None):
    """The empty guide of the collapsed model; same signature as :func:`ppl_models.hmm_align.model` but for
    ``params`` (the data are checked by the model)."""
    with data_plate(src, idx, num_data, name="sentences", dim=-1):
        pass


def build_enumerate(spec: ModelSpec, num_data: int | None = None) -> dict:
    """No network: the model always enumerates its chain. Returns ``{}``."""
    if spec.name != "hmm-align":
        raise ValueError(f"guide 'enumerate': expected the model 'hmm-align', received {spec.name!r}")
    return {}


register_guide("enumerate", model="hmm-align", guide=enumerate_guide, build=build_enumerate)
