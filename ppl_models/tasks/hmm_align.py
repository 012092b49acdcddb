r"""The HMM alignment model as an aligner: fit it by EM on tokenized text, then read links off its exact posterior.

.. code-block:: python

    from ppl_models.tasks import aer, hmm_align
    e2f = hmm_align.fit_hmm(english, french)          # 5 IBM Model 1 + 5 HMM EM iterations, English source
    f2e = hmm_align.fit_hmm(french, english)
    fwd = e2f.links(english, french)                   # {(english i, french j)}, 0-based
    bwd = [aer.transpose(s) for s in f2e.links(french, english)]
    aer.score(aer.symmetrize(fwd, bwd, "intersection"), aer.read_gold(path))

Links are read off the posterior marginals :math:`p(a_j = i \mid e, f)` of the forward–backward recursions
(:mod:`ppl_models.hmm_align`), as for IBM Model 1 (:mod:`ppl_models.tasks.ibm1`): each target word's most probable
position, none when that is NULL (``"posterior"``), or every link above a threshold (``"threshold"``).

**As a model of the package** (``ppl-models fit`` with ``[model] name = "hmm-align"``, then ``ppl-models align``):
the task trains it by exact EM with IBM Model 1's :class:`~ppl_models.tasks.ibm1.EMTrainer` — ``[model]
ibm1_iterations`` of IBM Model 1 start the table, then ``[train] num_epochs`` HMM iterations, one checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Sequence

import torch

from ppl_models.data.text import Vocab
from ppl_models.hmm_align import HMMAlignParams, HMMCorpus
from ppl_models.infer.em import fit_em
from ppl_models.tasks.alignment import read_run_vocab, write_run_files
from ppl_models.tasks.ibm1 import (
    EMTrainer,
    IBM1Aligner,
    check_text,
    corpus_pairs,
    encode_pairs,
    evaluate_em,
    load_em_tables,
)

__all__ = ["HMMAligner", "fit_hmm", "HMMEMTrainer", "resolve_config", "make_trainer", "evaluate",
           "write_run_files", "load_aligner"]


@dataclass
class HMMAligner(IBM1Aligner):
    """A fitted HMM alignment model and the vocabularies of its training text (``params``: an
    :class:`~ppl_models.hmm_align.HMMAlignParams`); links as :meth:`IBM1Aligner.links`, from the posterior
    marginals: each target word's most probable position (posterior decoding, not the Viterbi path, which for IBM
    Model 1 coincide)."""

    name: str = "hmm-align"
    title = "the HMM alignment model"

    def posteriors(self, src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]]) -> List[torch.Tensor]:
        r""":math:`p(a_j = i \mid e, f)` per pair: a ``(m, l + 1)`` tensor, column 0 NULL."""
        check_text("HMMAligner", src, tgt)
        return self.params.link_posteriors(encode_pairs(self.src_vocab, self.tgt_vocab, src, tgt, HMMCorpus))


def fit_hmm(src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]], *, num_iterations: int = 5,
            ibm1_iterations: int = 5, max_jump: int = 7, null_prob: float = 0.2, tol: float = 0.0,
            dtype: torch.dtype = torch.float64, progress: bool = False) -> HMMAligner:
    """The HMM alignment model of ``src`` words generating ``tgt`` words: ``ibm1_iterations`` of IBM Model 1, then
    ``num_iterations`` HMM EM iterations (:func:`ppl_models.infer.em.fit_em`).

    :param src: tokenized source sentences (the conditioning side).
    :param tgt: tokenized target sentences, one per source sentence (the generated side).
    """
    check_text("fit_hmm", src, tgt)
    src_vocab, tgt_vocab = Vocab.build(src), Vocab.build(tgt)
    corpus = encode_pairs(src_vocab, tgt_vocab, src, tgt, HMMCorpus)
    params = HMMAlignParams(len(src_vocab), len(tgt_vocab), max_jump=max_jump, null_prob=null_prob,
                            ibm1_iterations=ibm1_iterations, dtype=dtype).init_from_corpus(corpus)
    result = fit_em(params, corpus, num_iterations=num_iterations, tol=tol, progress=progress)
    return HMMAligner(params, src_vocab, tgt_vocab, result)


class HMMEMTrainer(EMTrainer):
    """:class:`~ppl_models.tasks.ibm1.EMTrainer` for a ``"hmm-align"`` run: the corpus is an :class:`HMMCorpus`,
    and :meth:`HMMAlignParams.init_from_corpus` runs the IBM Model 1 iterations first."""

    model_name = "hmm-align"

    @staticmethod
    def make_corpus(dataset, src_vocab_size: int, tgt_vocab_size: int) -> HMMCorpus:
        return HMMCorpus(*corpus_pairs(dataset), src_vocab_size, tgt_vocab_size)


def resolve_config(config):
    """Exact EM (:class:`HMMEMTrainer`): the guide is ``enumerate`` (set when unset), no ``[train] strategy``."""
    if config.train.strategy is not None:
        raise ValueError(f"model 'hmm-align' trains by exact EM; it takes no [train].strategy, received "
                         f"{config.train.strategy!r}")
    if config.guide.name not in (None, "enumerate"):
        raise ValueError(f"model 'hmm-align': [guide].name must be 'enumerate', received {config.guide.name!r}")
    return dataclasses.replace(config, guide=dataclasses.replace(config.guide, name="enumerate"))


def make_trainer(experiment, splits: dict, instance, **overrides) -> HMMEMTrainer:
    """The task's trainer (:mod:`ppl_models.tasks`): :class:`HMMEMTrainer`."""
    return HMMEMTrainer(experiment, splits, instance, **overrides)


def evaluate(experiment, instance, dataset, split: str):
    r"""The exact log-likelihood :math:`\log p(f \mid e)` of the split's pairs
    (:func:`ppl_models.tasks.ibm1.evaluate_em`)."""
    return evaluate_em(HMMEMTrainer, instance, dataset, split)


def load_aligner(experiment, **ignored) -> HMMAligner:
    """A trained ``"hmm-align"`` run (``Experiment.from_run_dir``) as an :class:`HMMAligner`: its vocabularies
    (``vocab.json``) and the newest readable checkpoint's parameters; no training data is loaded."""
    if experiment.config.model.name != "hmm-align":
        raise ValueError(f"{experiment.run_dir} holds a {experiment.config.model.name!r} run, not 'hmm-align'")
    src_vocab, tgt_vocab, lower = read_run_vocab(experiment)
    instance = experiment.build(1, {"src_vocab_size": len(src_vocab), "tgt_vocab_size": len(tgt_vocab)})
    params: HMMAlignParams = instance.modules["params"]
    return HMMAligner(params, src_vocab, tgt_vocab, load_em_tables(experiment, params), lower=lower)
