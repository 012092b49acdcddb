"""Corpus BLEU by sacreBLEU (:func:`ppl_models.tasks.translation.corpus_bleu`) against Papineni et al.'s definition
computed here by hand, and its reported signature."""

import math
from collections import Counter

import pytest

from ppl_models.tasks.translation import bleu_signature, corpus_bleu


def papineni_bleu(hypotheses, references, max_n=4):
    """Corpus BLEU in percent: the geometric mean of the clipped n-gram precisions (n = 1..4, summed over the
    corpus) times the brevity penalty min(1, exp(1 - r / c))."""
    matches, totals, c, r = [0] * max_n, [0] * max_n, 0, 0
    for hyp, ref in zip(hypotheses, references):
        c, r = c + len(hyp), r + len(ref)
        for n in range(1, max_n + 1):
            h = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            g = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            matches[n - 1] += sum(min(k, g[w]) for w, k in h.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    return 100 * math.exp(log_p + min(0.0, 1 - r / c))


def test_corpus_bleu_is_papinenis_on_token_ids():
    refs = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12], [3, 3, 4, 5, 1, 2]]
    hyps = [[1, 2, 3, 4, 6, 7], [8, 9, 10, 11, 13, 12], [3, 4, 5, 1, 2]]  # shorter corpus: a brevity penalty
    expected = papineni_bleu(hyps, refs)
    assert 10 < expected < 90
    assert corpus_bleu(hyps, refs) == pytest.approx(expected, rel=1e-9)
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    words = [[f"w{t}" for t in s] for s in hyps], [[f"w{t}" for t in s] for s in refs]
    assert corpus_bleu(*words) == pytest.approx(expected, rel=1e-9)  # tokens as strings: the same


def test_bleu_signature_names_the_settings():
    signature = bleu_signature()
    assert signature.startswith("nrefs:1|case:mixed|eff:no|tok:none|smooth:exp|version:"), signature
