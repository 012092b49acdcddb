"""IBM Model 1: the exact log-likelihood against brute force and Pyro's enumeration, EM against a plain-Python EM,
EM's monotonicity, the links, the Hansards loader.  Everything is float64 and tiny (single-threaded)."""

from __future__ import annotations

import collections
import json
import itertools
import math

import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

import ppl_models as pm
from ppl_models import ibm1
from ppl_models.data.text import pad_batch
from ppl_models.guides.ibm1 import enumerate_guide, exact_guide
from ppl_models.infer.em import EMModel, fit_em
from ppl_models.spec import ShapeError
from ppl_models.tasks import ibm1 as ibm1_task

# source words >= 1 (0 is NULL), target words >= 0; different lengths, so batches are padded
SRC = [[1, 2], [1, 3, 4], [2], [4, 3, 1, 2]]
TGT = [[1, 2, 3], [1], [3, 4], [2, 2, 4, 0]]
V_SRC, V_TGT = 5, 5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def corpus_and_params(iterations: int = 2):
    corpus = ibm1.IBM1Corpus(SRC, TGT, V_SRC, V_TGT)
    params = ibm1.IBM1Params(V_SRC, V_TGT).init_from_corpus(corpus)
    fit_em(params, corpus, num_iterations=iterations, tol=0.0)  # a table that is not uniform
    return corpus, params


def padded():
    src, src_lengths = pad_batch(SRC)
    tgt, tgt_lengths = pad_batch(TGT)
    return src, src_lengths, tgt, tgt_lengths


def brute_force_log_likelihood(params, e, f) -> float:
    """log of the sum over every alignment a in {0..l}^m of prod_j t(f_j | e_{a_j}) / (l + 1)."""
    e0 = [ibm1.NULL_INDEX] + list(e)
    t = lambda ei, fj: float(params.prob(torch.tensor(ei), torch.tensor(fj)))  # noqa: E731
    total = 0.0
    for a in itertools.product(range(len(e0)), repeat=len(f)):
        total += math.prod(t(e0[i], fj) / len(e0) for i, fj in zip(a, f))
    return math.log(total)


def reference_em(src, tgt, v_tgt, iterations):
    """Koehn (2010)'s EM for IBM Model 1 with NULL (None), in plain Python: the table after ``iterations``."""
    t = collections.defaultdict(lambda: 1.0 / v_tgt)
    for _ in range(iterations):
        count, total = collections.defaultdict(float), collections.defaultdict(float)
        for e, f in zip(src, tgt):
            e0 = [None] + e
            for fj in f:
                z = sum(t[(ei, fj)] for ei in e0)
                for ei in e0:
                    count[(ei, fj)] += t[(ei, fj)] / z
                    total[ei] += t[(ei, fj)] / z
        t = collections.defaultdict(float, {k: c / total[k[0]] for k, c in count.items()})
    return t


# ---------------------------------------------------------------------------------------------------------
# Exact log-likelihood
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iterations", [0, 3])
def test_log_likelihood_equals_the_sum_over_all_alignments(iterations):
    corpus, params = corpus_and_params(iterations)
    flat = params.log_likelihood(corpus)
    batch = ibm1.log_likelihood(params, *padded())
    brute = torch.tensor([brute_force_log_likelihood(params, e, f) for e, f in zip(SRC, TGT)], dtype=torch.float64)
    torch.testing.assert_close(flat, brute, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batch, brute, rtol=1e-12, atol=1e-12)


def test_pyro_enumeration_equals_the_closed_form_log_likelihood():
    """TraceEnum_ELBO with the empty guide sums every a_j out: -loss = sum_n log p(f | e), padding included."""
    corpus, params = corpus_and_params()
    model = lambda *args: ibm1.model(*args, params=params)  # noqa: E731
    loss = TraceEnum_ELBO(max_plate_nesting=2).loss(model, enumerate_guide, *padded())
    assert -loss == pytest.approx(float(params.log_likelihood(corpus).sum()), rel=1e-12)


def test_pyro_enumeration_of_a_subsample_is_scaled_by_n_over_batch():
    corpus, params = corpus_and_params()
    src, src_lengths, tgt, tgt_lengths = padded()
    idx = torch.tensor([1, 3])
    batch = (src[idx], src_lengths[idx], tgt[idx], tgt_lengths[idx], idx)
    model = lambda *args: ibm1.model(*args, params=params, num_data=4)  # noqa: E731
    guide = lambda *args: enumerate_guide(*args, num_data=4)  # noqa: E731
    loss = TraceEnum_ELBO(max_plate_nesting=2).loss(model, guide, *batch)
    expected = 2.0 * float(params.log_likelihood(corpus)[idx].sum())
    assert -loss == pytest.approx(expected, rel=1e-12)


def test_the_exact_guide_makes_every_elbo_sample_the_log_likelihood():
    corpus, params = corpus_and_params()
    model = lambda *args: ibm1.model(*args, params=params)  # noqa: E731
    guide = lambda *args: exact_guide(*args, params=params)  # noqa: E731
    expected = float(params.log_likelihood(corpus).sum())
    for _ in range(3):
        assert -Trace_ELBO(max_plate_nesting=2).loss(model, guide, *padded()) == pytest.approx(expected, rel=1e-10)


def test_posterior_of_a_batch_equals_the_flat_pair_posteriors():
    corpus, params = corpus_and_params()
    batch = ibm1.posterior(params, *padded())
    flat = corpus.split_pairs(params.pair_posteriors(corpus))
    for n, block in enumerate(flat):
        m, l1 = block.shape
        torch.testing.assert_close(batch[n, :m, :l1], block)
        assert float(batch[n, m:].abs().sum()) == 0 and float(batch[n, :, l1:].abs().sum()) == 0
        torch.testing.assert_close(block.sum(-1), torch.ones(m, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------
# EM
# ---------------------------------------------------------------------------------------------------------


def test_params_implement_the_em_protocol():
    assert isinstance(ibm1.IBM1Params(V_SRC, V_TGT), EMModel)


def test_em_log_likelihood_never_decreases():
    gen = torch.Generator().manual_seed(0)
    src = [torch.randint(1, 12, (int(n),), generator=gen).tolist() for n in torch.randint(1, 7, (40,), generator=gen)]
    tgt = [torch.randint(0, 10, (int(n),), generator=gen).tolist() for n in torch.randint(1, 7, (40,), generator=gen)]
    corpus = ibm1.IBM1Corpus(src, tgt, 12, 10)
    params = ibm1.IBM1Params(12, 10).init_from_corpus(corpus)
    result = fit_em(params, corpus, num_iterations=40, tol=0.0)
    trace = torch.tensor(result.log_likelihood)
    assert result.num_iterations == 40
    assert bool((trace.diff() >= -1e-12).all()), trace.diff().min()
    assert trace[-1] > trace[0] + 0.5  # EM did move (by 0.99 nats per pair)


def test_em_matches_a_plain_python_em():
    corpus, params = corpus_and_params(iterations=4)
    ref = reference_em(SRC, TGT, V_TGT, 4)
    codes = params.codes.tolist()
    expected = torch.tensor([ref[(None if c // V_TGT == 0 else c // V_TGT, c % V_TGT)] for c in codes],
                            dtype=torch.float64)
    torch.testing.assert_close(params.t, expected, rtol=1e-12, atol=1e-15)
    assert sum(v > 0 for v in ref.values()) == len(codes)  # the table holds exactly the co-occurring pairs
    # every row (NULL and the four source words) sums to one over the target vocabulary
    rows = params.prob(torch.arange(V_SRC)[:, None], torch.arange(V_TGT)).sum(-1)
    torch.testing.assert_close(rows, torch.ones(V_SRC, dtype=torch.float64), rtol=0, atol=1e-12)


def test_table_state_dict_loads_into_an_empty_table():
    _, params = corpus_and_params()
    fresh = ibm1.IBM1Params(V_SRC, V_TGT)
    fresh.load_state_dict(params.state_dict())
    assert torch.equal(fresh.codes, params.codes) and torch.equal(fresh.t, params.t)
    assert not fresh.is_uniform


def test_samples_follow_the_table():
    _, params = corpus_and_params()
    e = torch.full((40000,), 3)
    draws = ibm1.TranslationCategorical(params, e).sample()
    freq = torch.bincount(draws, minlength=V_TGT).double() / len(draws)
    p = params.prob(torch.tensor(3), torch.arange(V_TGT))
    assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / len(draws)).sqrt() + 1e-12).all()), (freq, p)


# ---------------------------------------------------------------------------------------------------------
# Checks, registry
# ---------------------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_site():
    _, params = corpus_and_params()
    src, src_lengths, tgt, tgt_lengths = padded()
    bad = src.clone()
    bad[0, 0] = 0  # NULL inside a real source sentence
    with pytest.raises(ShapeError, match=r"source word \(src\).*0 is NULL"):
        ibm1.model(bad, src_lengths, tgt, tgt_lengths, params=params)
    with pytest.raises(ShapeError, match="tgt_lengths"):
        ibm1.model(src, src_lengths, tgt, tgt_lengths[:2], params=params)
    with pytest.raises(ShapeError, match="'tgt'"):
        ibm1.model(src, src_lengths, tgt.double(), tgt_lengths, params=params)
    with pytest.raises(ShapeError, match=r"target word \(tgt\)"):
        ibm1.log_likelihood(params, src, src_lengths, tgt + V_TGT, tgt_lengths)
    with pytest.raises(ValueError, match="sentence pair 1: expected a non-empty target"):
        ibm1.IBM1Corpus([[1], [2]], [[1], []], V_SRC, V_TGT)
    with pytest.raises(ShapeError, match="vocabulary sizes"):
        params.e_step(ibm1.IBM1Corpus([[1]], [[1]], V_SRC, V_TGT + 1))


def test_registered_with_its_guides():
    inst = pm.instantiate("ibm1", "enumerate", num_data=4, model_kwargs={"src_vocab_size": V_SRC,
                                                                         "tgt_vocab_size": V_TGT})
    assert inst.spec.local_latents[0].name == "a" and inst.spec.data_plate == "sentences"
    params = inst.modules["params"].init_from_corpus(ibm1.IBM1Corpus(SRC, TGT, V_SRC, V_TGT))
    loss = TraceEnum_ELBO(max_plate_nesting=2).loss(inst.model, inst.guide, *padded())
    assert -loss == pytest.approx(float(ibm1.log_likelihood(params, *padded()).sum()), rel=1e-12)
    assert "exact" in pm.guide_names("ibm1")


# ---------------------------------------------------------------------------------------------------------
# Links from text
# ---------------------------------------------------------------------------------------------------------


def test_viterbi_and_threshold_links_of_given_posteriors():
    post = torch.tensor([[0.5, 0.3, 0.2],  # NULL wins: unaligned
                         [0.1, 0.2, 0.7],
                         [0.2, 0.4, 0.4],  # a tie between words: the leftmost
                         [0.0, 0.0, 0.0]])  # no probability at all (unseen word): unaligned
    assert ibm1_task.viterbi_links([post]) == [{(1, 1), (0, 2)}]
    assert ibm1_task.threshold_links([post], 0.25) == [{(0, 0), (1, 1), (0, 2), (1, 2)}]
    assert ibm1_task.threshold_links([post], 0.5) == [{(1, 1)}]


def test_fit_ibm1_learns_the_textbook_example():
    """Koehn (2010)'s das Haus / the house corpus: EM finds the word-for-word links (and NULL stays unused)."""
    de = [["das", "haus"], ["das", "buch"], ["ein", "buch"]]
    en = [["the", "house"], ["the", "book"], ["a", "book"]]
    fit = ibm1_task.fit_ibm1(de, en, num_iterations=30)
    assert ibm1_task.align(fit, de, en) == [{(0, 0), (1, 1)}] * 3
    t = lambda e, f: float(fit.params.prob(torch.tensor(fit.src_vocab.stoi[e]),  # noqa: E731
                                           torch.tensor(fit.tgt_vocab.stoi[f])))
    assert t("das", "the") > 0.9 and t("buch", "book") > 0.9
    unseen = ibm1_task.align(fit, [["das", "auto"]], [["the", "car"]])
    assert unseen == [{(0, 0)}]  # "car" is unknown: no link; "auto" is unknown: never linked
    assert ibm1_task.unknown_counts(fit, [["das", "auto"]], [["the", "car"]]) == {
        "src_unknown": 1, "src_tokens": 2, "tgt_unknown": 1, "tgt_tokens": 2}


def test_hansards_text_is_read_and_lowercased(shared_data):
    from ppl_models.data.hansards import hansards_text

    en, fr = hansards_text("trial", data_dir=shared_data)
    assert len(en) == len(fr) == 37
    assert all(w == w.lower() for s in en + fr for w in s)
    cased_en, _ = hansards_text("trial", data_dir=shared_data, lower=False)
    assert any(w != w.lower() for s in cased_en for w in s)
    assert [len(s) for s in cased_en] == [len(s) for s in en]
    test_en, test_fr = hansards_text("test", data_dir=shared_data)
    assert len(test_en) == len(test_fr) == 447


# ---------------------------------------------------------------------------------------------------------
# As a model of the package: ppl-models fit (exact EM), evaluate, align --gold
# ---------------------------------------------------------------------------------------------------------


def _hansards_config(make, source: str, target: str, name: str):
    """IBM Model 1 on the Hansards test text (``hansards_em_config``), 5 EM iterations."""
    return make(source, target, name, 'name = "ibm1"', num_epochs=5)


def test_fit_by_em_then_align_the_trial_set_with_gold(tmp_path, shared_data, capsys, hansards_em_config):
    """``ppl-models fit`` trains IBM Model 1 by exact EM (no SVI engine), writes its vocabularies; ``ppl-models
    align`` reads the run back without the corpus and, with ``--reverse`` and ``--gold``, scores both directions
    and their intersection on the 37 trial pairs (cased input, lowercased as the run's text was)."""
    from ppl_models.app.cli import main as cli_main

    runs = {}
    for name, (s, t) in {"ef": ("e", "f"), "fe": ("f", "e")}.items():
        runs[name] = tmp_path / name
        assert cli_main(["fit", str(_hansards_config(hansards_em_config, s, t, name)), "--run-dir",
                         str(runs[name]), "--no-progress", "--no-evaluate"]) == 0
        assert (runs[name] / "vocab.json").is_file()
    history = json.loads((runs["ef"] / "history.json").read_text())
    assert history["step"] == [1, 2, 3, 4, 5]
    assert all(b >= a - 1e-9 for a, b in zip(history["train_elbo"], history["train_elbo"][1:]))  # EM never decreases
    h = shared_data / "hansards_align"
    out = tmp_path / "trial.align"
    capsys.readouterr()
    assert cli_main(["align", str(runs["ef"]), str(h / "dev.e.gz"), str(h / "dev.f.gz"), "--reverse",
                     str(runs["fe"]), "--gold", str(h / "dev.wa.nonullalign.gz"), "-o", str(out),
                     "--no-progress"]) == 0
    err = capsys.readouterr().err
    rows = {line.split()[0]: [float(x) for x in line.split()[1:4]] for line in err.splitlines()
            if line.split() and line.split()[0] in ("forward", "reverse", "intersection")}
    assert set(rows) == {"forward", "reverse", "intersection"}, err
    for aer_value, precision, recall in rows.values():
        assert 0.0 < aer_value < 0.8 and 0.0 < precision <= 1.0 and 0.0 < recall <= 1.0
    assert rows["intersection"][1] > max(rows["forward"][1], rows["reverse"][1])  # intersecting raises precision
    assert "unknown tokens (<unk>), forward: ibm1: source" in err
    lines = out.read_text().splitlines()
    assert len(lines) == 37
    # the output is the intersection: each link also in both single directions
    fwd = tmp_path / "fwd.align"
    assert cli_main(["align", str(runs["ef"]), str(h / "dev.e.gz"), str(h / "dev.f.gz"), "-o", str(fwd),
                     "--no-progress"]) == 0
    for both, one in zip(lines, fwd.read_text().splitlines()):
        assert set(both.split()) <= set(one.split())
    # an alignment run's --links q does not exist for IBM Model 1: one clear error
    capsys.readouterr()
    assert cli_main(["align", str(runs["ef"]), str(h / "dev.e.gz"), str(h / "dev.f.gz"), "--links", "q",
                     "--no-progress"]) == 2
    assert "IBM Model 1 links by 'posterior'" in capsys.readouterr().err


def test_evaluate_and_resume_an_em_run(tmp_path, shared_data, hansards_em_config):
    """``ppl-models evaluate`` loads the EM checkpoint; ``--resume`` with more iterations continues from its table
    to the same table a longer run reaches."""
    from ppl_models.app.cli import main as cli_main

    config = _hansards_config(hansards_em_config, "e", "f", "ef")
    short, full = tmp_path / "short", tmp_path / "full"
    assert cli_main(["fit", str(config), "--run-dir", str(short), "--no-progress", "--no-evaluate",
                     "--num-epochs", "2"]) == 0
    assert cli_main(["fit", str(config), "--run-dir", str(short), "--no-progress", "--no-evaluate", "--resume"]) == 0
    assert cli_main(["fit", str(config), "--run-dir", str(full), "--no-progress", "--no-evaluate"]) == 0
    a, b = (json.loads((d / "history.json").read_text())["train_elbo"] for d in (short, full))
    assert len(a) == len(b) == 5
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-12, atol=0)
    assert cli_main(["evaluate", str(full), "--split", "train"]) == 0
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["sentences_with_zero_probability"] == 0  # the training text: every pair co-occurred
    torch.testing.assert_close(-metrics["nll_per_token"] * metrics["num_tokens"] / metrics["num_data"], b[-1],
                               rtol=1e-9, atol=0)
