"""The HMM alignment model: the forward algorithm, the posterior marginals and the expected jump counts against
brute-force sums over every alignment, Pyro's enumeration against the forward algorithm, EM (exact with fixed
jumps: never decreasing; with jumps: recovering the jump distribution of data simulated from the model), bad
input, and ``ppl-models fit`` / ``align`` / ``evaluate`` on the Hansards text.  float64, tiny, one thread."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from ppl_models import hmm_align
from ppl_models.data.text import pad_batch
from ppl_models.guides.hmm_align import enumerate_guide
from ppl_models.ibm1 import NULL_INDEX
from ppl_models.infer.em import EMModel, fit_em
from ppl_models.spec import ShapeError
from ppl_models.tasks import hmm_align as hmm_task

# source words >= 1 (0 is NULL), target words >= 0; different lengths, so chunks are padded
SRC = [[1, 2], [1, 3, 4], [2], [4, 3, 1, 2]]
TGT = [[1, 2, 3], [1], [3, 4], [2, 2, 4, 0]]
V_SRC, V_TGT = 5, 5
MAX_JUMP, P0 = 2, 0.3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def corpus_and_params(chunk_size=2, seed=0, **kwargs):
    """A corpus in chunks of 2 (padding in both lengths) and random positive parameters (not an EM fixed point)."""
    corpus = hmm_align.HMMCorpus(SRC, TGT, V_SRC, V_TGT, chunk_size=chunk_size)
    params = hmm_align.HMMAlignParams(V_SRC, V_TGT, max_jump=MAX_JUMP, null_prob=P0, **kwargs)
    params.init_from_corpus(corpus)
    gen = torch.Generator().manual_seed(seed)
    params.trans.t = torch.rand(params.trans.num_entries, generator=gen, dtype=torch.float64) + 0.1
    params.jump.copy_(torch.rand(2 * MAX_JUMP + 1, generator=gen, dtype=torch.float64) + 0.1)
    return corpus, params


def alignments(params, e, f):
    """Every alignment a in {0..l}^m (0 = NULL) with its joint probability p(a, f | e), by the generative story."""
    t = lambda ei, fj: float(params.trans.prob(torch.tensor(ei), torch.tensor(fj)))  # noqa: E731
    s = lambda d: float(params.jump[max(-MAX_JUMP, min(MAX_JUMP, d)) + MAX_JUMP])  # noqa: E731
    for a in itertools.product(range(len(e) + 1), repeat=len(f)):
        prob, last, moves = 1.0, 0, []
        for aj, fj in zip(a, f):
            if aj == 0:
                prob *= P0 * t(NULL_INDEX, fj)
            else:
                prob *= (1 - P0) * s(aj - last) / sum(s(i - last) for i in range(1, len(e) + 1)) * t(e[aj - 1], fj)
                moves.append((last, aj))
                last = aj
        yield a, prob, moves


def padded():
    src, src_lengths = pad_batch(SRC)
    tgt, tgt_lengths = pad_batch(TGT)
    return src, src_lengths, tgt, tgt_lengths


# ---------------------------------------------------------------------------------------------------------
# Exact quantities against brute force
# ---------------------------------------------------------------------------------------------------------


def test_forward_algorithm_equals_the_sum_over_every_alignment():
    corpus, params = corpus_and_params()
    expected = [math.log(sum(p for _, p, _ in alignments(params, e, f))) for e, f in zip(SRC, TGT)]
    torch.testing.assert_close(params.log_likelihood(corpus), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(hmm_align.log_likelihood(params, *padded()), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=0)


def test_posterior_marginals_and_expected_moves_equal_brute_force():
    """The E-step's statistics: p(a_j = i | e, f) and the expected number of moves i' -> i per source length."""
    corpus, params = corpus_and_params()
    posts = params.link_posteriors(corpus)
    L = max(map(len, SRC))
    moves_expected = torch.zeros(L + 1, L + 1, L, dtype=torch.float64)  # [l, i', i - 1]
    for n, (e, f) in enumerate(zip(SRC, TGT)):
        table = list(alignments(params, e, f))
        z = sum(p for _, p, _ in table)
        marg = torch.zeros(len(f), len(e) + 1, dtype=torch.float64)
        for a, p, moves in table:
            for j, aj in enumerate(a):
                marg[j, aj] += p / z
            for last, i in moves:
                moves_expected[len(e), last, i - 1] += p / z
        torch.testing.assert_close(posts[n], marg, rtol=1e-10, atol=1e-12)
    _, moves = params.e_step(corpus)
    torch.testing.assert_close(moves, moves_expected, rtol=1e-10, atol=1e-12)


def test_pyro_enumeration_equals_the_forward_algorithm():
    """TraceEnum_ELBO over the model's markov chain (every a_j enumerated, padded positions point masses) with the
    empty guide is exactly -sum log p(f | e)."""
    _, params = corpus_and_params()
    args = padded()
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(lambda *a: hmm_align.model(*a, params=params), enumerate_guide,
                                                    *args)
    assert loss == pytest.approx(-float(hmm_align.log_likelihood(params, *args).sum()), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# EM
# ---------------------------------------------------------------------------------------------------------


def test_params_implement_the_em_protocol_and_exact_em_never_decreases():
    corpus = hmm_align.HMMCorpus(SRC, TGT, V_SRC, V_TGT, chunk_size=2)
    params = hmm_align.HMMAlignParams(V_SRC, V_TGT, max_jump=MAX_JUMP, null_prob=P0, update_jumps=False,
                                      ibm1_iterations=0).init_from_corpus(corpus)  # normalized rows, uniform
    params.jump.copy_(torch.tensor([0.1, 0.2, 0.3, 0.3, 0.1], dtype=torch.float64))
    assert isinstance(params, EMModel)
    jump = params.jump.clone()
    result = fit_em(params, corpus, num_iterations=8, tol=0.0)
    trace = result.log_likelihood
    assert all(b >= a - 1e-12 for a, b in zip(trace, trace[1:])) and trace[-1] > trace[0] + 0.5
    assert torch.equal(params.jump, jump)  # fixed


def simulate(num_pairs, src_vocab, tgt_vocab, jump, seed):
    """Sentence pairs drawn from the generative story: a permutation-free 'translation' t(f | e) concentrated on
    f = e (mod the target vocabulary), NULL words uniform, alignments by the HMM with jump distribution ``jump``.
    Returns the pairs and the true alignments."""
    gen = torch.Generator().manual_seed(seed)
    D = (len(jump) - 1) // 2
    src, tgt, gold = [], [], []
    for _ in range(num_pairs):
        length = int(torch.randint(3, 9, (), generator=gen))
        e = torch.randint(1, src_vocab, (length,), generator=gen).tolist()
        m = int(torch.randint(3, 9, (), generator=gen))
        f, a, last = [], [], 0
        for _ in range(m):
            if float(torch.rand((), generator=gen)) < P0:
                f.append(int(torch.randint(tgt_vocab, (), generator=gen)))
                a.append(0)
                continue
            w = torch.stack([jump[max(-D, min(D, i - last)) + D] for i in range(1, length + 1)])
            i = int(torch.multinomial(w, 1, generator=gen)) + 1
            word = e[i - 1] % tgt_vocab if float(torch.rand((), generator=gen)) < 0.8 else \
                int(torch.randint(tgt_vocab, (), generator=gen))
            f.append(word)
            a.append(i)
            last = i
        src.append(e)
        tgt.append(f)
        gold.append(a)
    return src, tgt, gold


@pytest.mark.slow
def test_em_recovers_the_jump_distribution_of_simulated_data():
    """Data simulated from the model (a monotone-leaning jump distribution): after EM the jump distribution is
    within 0.05 of the truth in total variation (uniform is 0.46 away; GIZA++'s count normalization, which ignores
    the normalizers, ends 0.2 away here), and the posterior links agree with the simulated alignments more often
    than those of IBM Model 1 (no jumps) it started from."""
    true_jump = torch.tensor([0.02, 0.08, 0.05, 0.60, 0.15, 0.06, 0.04], dtype=torch.float64)  # d = -3..3
    src, tgt, gold = simulate(3000, 40, 40, true_jump, seed=1)
    corpus = hmm_align.HMMCorpus(src, tgt, 40, 40)
    params = hmm_align.HMMAlignParams(40, 40, max_jump=3, null_prob=P0, ibm1_iterations=5).init_from_corpus(corpus)

    def accuracy(posteriors):
        hits = sum(int(p.argmax(-1)[j]) == aj for p, a in zip(posteriors, gold) for j, aj in enumerate(a) if aj)
        return hits / sum(1 for a in gold for aj in a if aj)

    ibm1_accuracy = accuracy(corpus.ibm1.split_pairs(params.trans.pair_posteriors(corpus.ibm1)))  # the start
    uniform_tv = 0.5 * float((true_jump - 1 / 7).abs().sum())
    fit_em(params, corpus, num_iterations=15, tol=0.0)
    tv = 0.5 * float((params.jump - true_jump).abs().sum())
    assert tv < 0.05 < uniform_tv, (tv, params.jump)
    assert accuracy(params.link_posteriors(corpus)) > ibm1_accuracy + 0.01  # ~11k links: SE of the gain < 0.003


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"max_jump must be an integer >= 1, received 0"):
        hmm_align.HMMAlignParams(V_SRC, V_TGT, max_jump=0)
    with pytest.raises(ValueError, match=r"null_prob must be a probability in \[0, 1\), received 1.0"):
        hmm_align.HMMAlignParams(V_SRC, V_TGT, null_prob=1.0)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer, received 0"):
        hmm_align.HMMCorpus(SRC, TGT, V_SRC, V_TGT, chunk_size=0)
    with pytest.raises(ShapeError, match=r"source word: expected indices in \[1, 4\] \(0 is NULL\), received 0"):
        hmm_align.HMMCorpus([[0, 1]], [[1]], V_SRC, V_TGT)
    _, params = corpus_and_params()
    src, src_lengths, tgt, tgt_lengths = padded()
    with pytest.raises(ShapeError, match=r"site 'tgt_lengths': expected lengths in \[1, 4\]"):
        hmm_align.log_likelihood(params, src, src_lengths, tgt, tgt_lengths + 1)
    with pytest.raises(TypeError, match=r"expected an HMMCorpus, received IBM1Corpus"):
        params.e_step(hmm_align.HMMCorpus(SRC, TGT, V_SRC, V_TGT).ibm1)


# ---------------------------------------------------------------------------------------------------------
# As a model of the package: ppl-models fit (exact EM), align --gold, evaluate, resume
# ---------------------------------------------------------------------------------------------------------


def _hansards_config(make, source: str, target: str, name: str):
    """The HMM on the Hansards test text (``hansards_em_config``): 3 IBM Model 1 then 3 HMM EM iterations."""
    return make(source, target, name, 'name = "hmm-align"\nibm1_iterations = 3', num_epochs=3)


def test_fit_align_evaluate_and_resume_on_the_hansards_text(tmp_path, shared_data, capsys, hansards_em_config):
    """``ppl-models fit`` trains the HMM by EM after IBM Model 1's iterations; ``align --reverse --gold`` scores
    both directions and the intersection on the trial pairs; ``evaluate`` reproduces the last EM log-likelihood;
    a run resumed to more iterations ends where an uninterrupted one does."""
    from ppl_models.app.cli import main as cli_main

    runs = {}
    for name, (s, t) in {"ef": ("e", "f"), "fe": ("f", "e")}.items():
        runs[name] = tmp_path / name
        assert cli_main(["fit", str(_hansards_config(hansards_em_config, s, t, name)), "--run-dir",
                         str(runs[name]), "--no-progress", "--no-evaluate"]) == 0
    h = shared_data / "hansards_align"
    capsys.readouterr()
    assert cli_main(["align", str(runs["ef"]), str(h / "dev.e.gz"), str(h / "dev.f.gz"), "--reverse",
                     str(runs["fe"]), "--gold", str(h / "dev.wa.nonullalign.gz"), "-o", str(tmp_path / "a.align"),
                     "--no-progress"]) == 0
    err = capsys.readouterr().err
    rows = {line.split()[0]: [float(x) for x in line.split()[1:4]] for line in err.splitlines()
            if line.split() and line.split()[0] in ("forward", "reverse", "intersection")}
    assert set(rows) == {"forward", "reverse", "intersection"}, err
    assert rows["intersection"][1] > max(rows["forward"][1], rows["reverse"][1]), err
    assert "hmm-align: source" in err
    history = json.loads((runs["ef"] / "history.json").read_text())["train_elbo"]
    assert cli_main(["evaluate", str(runs["ef"]), "--split", "train"]) == 0
    metrics = json.loads((runs["ef"] / "metrics.json").read_text())
    assert metrics["model"] == "hmm-align" and metrics["sentences_with_zero_probability"] == 0
    torch.testing.assert_close(-metrics["nll_per_token"] * metrics["num_tokens"] / metrics["num_data"], history[-1],
                               rtol=1e-9, atol=0)
    config = _hansards_config(hansards_em_config, "e", "f", "ef")
    short = tmp_path / "short"
    assert cli_main(["fit", str(config), "--run-dir", str(short), "--no-progress", "--no-evaluate",
                     "--num-epochs", "1"]) == 0
    assert cli_main(["fit", str(config), "--run-dir", str(short), "--no-progress", "--no-evaluate", "--resume"]) == 0
    resumed = json.loads((short / "history.json").read_text())["train_elbo"]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(history), rtol=1e-12, atol=0)


def test_fit_hmm_aligns_a_word_for_word_toy_text():
    """fit_hmm from text: its EM trace ends above its start (IBM Model 1's table), and it aligns a toy corpus
    (each word translated in place, no word twice in a sentence) perfectly."""
    words = ["a", "b", "c", "d", "e", "f"]
    gen = torch.Generator().manual_seed(0)
    src, tgt = [], []
    for _ in range(200):
        sent = [words[int(k)] for k in torch.randperm(6, generator=gen)[: int(torch.randint(2, 6, (), generator=gen))]]
        src.append(sent)
        tgt.append([w.upper() for w in sent])
    aligner = hmm_task.fit_hmm(src, tgt, num_iterations=3, ibm1_iterations=3)
    assert aligner.em.log_likelihood[-1] >= aligner.em.log_likelihood[0]
    links = aligner.links(src[:20], tgt[:20])
    assert all(link == {(j, j) for j in range(len(s))} for link, s in zip(links, src[:20]))
