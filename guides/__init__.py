"""Guides (variational families) for the models of :mod:`ppl_models`.

One module per model, under the model's name (:mod:`ppl_models.guides.vae`), plus the
generic builders that work for any model from its declared structure:
:mod:`ppl_models.guides.mean_field` (per-datapoint :math:`\\lambda_i`, sparse updates) and
:mod:`ppl_models.guides.amortized` (an MLP inference network).
"""
