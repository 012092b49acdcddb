"""Variational objectives (Pyro ELBOs) chosen by name.

======================  ===============================================================
name                    Pyro objective
======================  ===============================================================
``Trace_ELBO``          reparameterized gradients where the guide allows, score-function otherwise
``TraceGraph_ELBO``     as above, with Rao-Blackwellized score-function terms and baselines
``TraceMeanField_ELBO`` analytic KL between guide and prior sites where it is known
``TraceEnum_ELBO``      parallel enumeration of discrete sites marked for enumeration
``RenyiELBO``           the Rényi α bound (``alpha``; α = 0 is the IWAE bound)
``IWAE``                ``RenyiELBO(alpha=0)`` with ``num_particles`` importance samples
======================  ===============================================================
"""

from __future__ import annotations

import pyro.infer as infer

from ppl_models.registry import UnknownNameError

__all__ = ["ELBO_NAMES", "make_elbo"]

_ELBOS = {
    "Trace_ELBO": infer.Trace_ELBO,
    "TraceGraph_ELBO": infer.TraceGraph_ELBO,
    "TraceMeanField_ELBO": infer.TraceMeanField_ELBO,
    "TraceEnum_ELBO": infer.TraceEnum_ELBO,
    "RenyiELBO": infer.RenyiELBO,
    "IWAE": infer.RenyiELBO,
}
ELBO_NAMES = tuple(_ELBOS)


def make_elbo(
    name: str,
    *,
    num_particles: int = 1,
    vectorize_particles: bool = True,
    max_plate_nesting: int | None = None,
    alpha: float | None = None,
) -> infer.ELBO:
    """The Pyro ELBO called ``name`` (see the table above).

    :param num_particles: Monte Carlo samples per step (the number of importance samples ``K`` for IWAE).
    :param vectorize_particles: draw the particles in one vectorized pass (a plate) rather than a loop.
    :param max_plate_nesting: the model's plate depth (inferred by Pyro when ``None``).
    :param alpha: the Rényi α, only for ``RenyiELBO`` (default 0).
    """
    if name not in _ELBOS:
        raise UnknownNameError("ELBO", name, _ELBOS)
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles: expected a positive integer, received {num_particles!r}")
    kwargs = dict(num_particles=num_particles, vectorize_particles=vectorize_particles)
    if max_plate_nesting is not None:
        kwargs["max_plate_nesting"] = max_plate_nesting
    if name == "IWAE":
        if alpha not in (None, 0, 0.0):
            raise ValueError(f"IWAE is RenyiELBO with alpha=0; received alpha={alpha!r} (use RenyiELBO)")
        kwargs["alpha"] = 0.0
    elif alpha is not None:
        if name != "RenyiELBO":
            raise ValueError(f"alpha applies only to RenyiELBO, not to {name}")
        kwargs["alpha"] = float(alpha)
    elif name == "RenyiELBO":
        kwargs["alpha"] = 0.0
    return _ELBOS[name](**kwargs)
