"""The latent-alignment model (ppl_models/alignment.py) and its guides: exact tests first, then statistical ones.

Tiny instances in float64; data simulated from the synthetic task or random tokens (no real data needed), except the
Multi30k loader test, which uses the shared copy when present.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO

import ppl_models as pm
from ppl_models.alignment import (
    VARIANTS,
    AlignedCategorical,
    emission_table,
    log_marginal,
    log_normalizer,
)
from ppl_models.app.cli import main as cli_main
from ppl_models.app.config import ConfigError
from ppl_models.data.parallel import parallel_splits, synthetic_pairs, synthetic_splits
from ppl_models.data.text import TextDataError, pad_batch
from ppl_models.distributions import TokenCategorical
from ppl_models.app.experiment import Experiment
from ppl_models.spec import ShapeError
from ppl_models.tasks.alignment import evaluate_alignment

REPO = Path(__file__).resolve().parents[1]
SRC_V, TGT_V = 9, 11


def make(variant: str, guide: str | None = None, num_data: int = 4, dtype=torch.float64, **sizes):
    """A tiny model (and its variant's guide) in ``dtype`` with random weights of a visible scale."""
    guide = guide or VARIANTS[variant][1]
    kwargs = dict(src_vocab_size=SRC_V, tgt_vocab_size=TGT_V, emb_dim=5, hidden_dim=4, out_dim=3, variant=variant)
    kwargs.update(sizes)
    inst = pm.instantiate("alignment", guide, num_data=num_data, model_kwargs=kwargs,
                          guide_kwargs={"emb_dim": 4, "hidden_dim": 3} if guide == "inference-network" else {})
    inst.modules.to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in inst.modules.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    return inst


def batch(lengths, gen_seed=0):
    """A ragged batch: ``lengths`` = [(S, T), ...] (T without <eos>), random non-special tokens."""
    gen = torch.Generator().manual_seed(gen_seed)
    src, tgt = [], []
    for s, t in lengths:
        src.append(torch.randint(4, SRC_V, (s,), generator=gen).tolist())
        tgt.append(torch.randint(4, TGT_V, (t,), generator=gen).tolist() + [3])
    s, sl = pad_batch(src)
    t, tl = pad_batch(tgt)
    return s, sl, t, tl


def brute_force_log_lik(inst, args) -> torch.Tensor:
    """log p(y | x) per sentence by summing p(z, y | x) over every joint alignment z_1..z_T (no factorization used)."""
    net = inst.modules["net"]
    src, src_lengths, tgt, tgt_lengths = args
    states = net.states(*args)
    out = []
    for b in range(src.shape[0]):
        S, T = int(src_lengths[b]), int(tgt_lengths[b])
        terms = []
        for z in itertools.product(range(S), repeat=T):
            zt = torch.tensor(z)
            hidden = net.out_hidden(states.hidden[b, :T])  # (T, D)
            memory = net.out_memory(states.memory[b, zt])  # (T, D)
            logits = net.out(hidden + memory).log_softmax(-1)  # (T, V): full softmax, no normalizer trick
            log_prior = states.prior_logits[b, torch.arange(T), zt]
            terms.append((log_prior + logits[torch.arange(T), tgt[b, :T]]).sum())
        out.append(torch.logsumexp(torch.stack(terms), 0))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ exact
def test_exact_equals_brute_force_sum_over_alignments():
    inst = make("exact")
    args = batch([(3, 2), (2, 3), (3, 1)])
    idx = torch.arange(3)
    loss = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(inst.model, inst.guide, *args, idx, num_data=3)
    expected = brute_force_log_lik(inst, args)
    torch.testing.assert_close(-loss, expected.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(log_marginal(inst.modules["net"], *args)["log_lik"].sum(-1), expected, rtol=1e-6, atol=0)


def test_log_normalizer_matches_direct_logsumexp_including_float32_underflow():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 4, 7, generator=gen, dtype=torch.float64)
    direct = torch.logsumexp(a[:, :, None, :] + b[:, None, :, :], -1)
    torch.testing.assert_close(log_normalizer(a, b), direct, rtol=1e-12, atol=0)
    # float32 whose per-factor ranges underflow the product (a peaks where b is -200 below its max)
    a32 = torch.full((1, 1, 3), -300.0)
    a32[0, 0, 0] = 0.0
    b32 = torch.full((1, 1, 3), 0.0)
    b32[0, 0, 0] = -200.0
    expected = torch.logsumexp(a32[:, :, None, :].double() + b32[:, None, :, :].double(), -1).float()
    torch.testing.assert_close(log_normalizer(a32, b32), expected)
    # the fused backward: finite differences in float64, and the softmax weights where float32 underflowed
    assert torch.autograd.gradcheck(log_normalizer, (a.requires_grad_(), b.requires_grad_()))
    a32.requires_grad_(), b32.requires_grad_()
    log_normalizer(a32, b32).sum().backward()
    torch.testing.assert_close(a32.grad, torch.tensor([[[1.0, 0.0, 0.0]]]))
    torch.testing.assert_close(b32.grad, torch.tensor([[[1.0, 0.0, 0.0]]]))


def test_aligned_categorical_log_prob_both_paths_equal_the_full_softmax():
    inst = make("exact")
    net = inst.modules["net"]
    args = batch([(3, 3), (2, 2)])
    states = net.states(*args)
    u, v = net.out_hidden(states.hidden), net.out_memory(states.memory)
    tgt = args[2]
    z = torch.tensor([[0, 2, 1, 0], [1, 0, 1, 0]])
    d = AlignedCategorical(u, v, net.out, z)
    full = torch.distributions.Categorical(logits=d.logits()).log_prob(tgt)
    torch.testing.assert_close(d.log_prob(tgt), full)  # one alignment per step
    table = emission_table(u, v, net.out, tgt)  # every alignment
    torch.testing.assert_close(table.gather(-1, z[..., None]).squeeze(-1), full)
    tok = TokenCategorical(d.logits())
    torch.testing.assert_close(tok.log_prob(tgt), full)


# ------------------------------------------------------------------------------------------------ bounds
def test_variational_enum_elbo_below_exact_and_equal_with_the_exact_posterior():
    args = batch([(3, 2), (2, 3), (4, 4)])
    idx = torch.arange(3)
    elbo = TraceEnum_ELBO(max_plate_nesting=2)
    inst = make("variational-enum")
    log_lik = log_marginal(inst.modules["net"], *args)["log_lik"].sum()
    value = -elbo.differentiable_loss(inst.model, inst.guide, *args, idx, num_data=3)
    assert value < log_lik - 1e-3  # a random q is strictly worse
    # hand-computed sum over source positions of q * [log p(y|z) + log p(z) - log q] equals TraceEnum's value
    net, inference = inst.modules["net"], inst.modules["inference"]
    out = log_marginal(net, *args)
    q = inference(out["states"].memory, out["states"].src_mask, args[2], args[3])[0]
    by_hand = (q.exp() * (out["log_prior"] + out["log_emission"] - q)).sum(-1)[out["mask"]].sum()
    torch.testing.assert_close(value, by_hand, rtol=1e-10, atol=0)
    # q = the exact posterior: the bound is tight
    pyro.clear_param_store()
    post = make("variational-enum", guide="exact-posterior")
    tight = -elbo.differentiable_loss(post.model, post.guide, *args, idx, num_data=3)
    torch.testing.assert_close(tight, log_marginal(post.modules["net"], *args)["log_lik"].sum(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("sizes", [{}, {"input_feed": True}, {"jump_width": 2}], ids=["plain", "input-feed", "jump"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padding_never_changes_a_sentence_likelihood(variant, sizes):
    if variant == "soft" and "jump_width" in sizes:
        pytest.skip("the jump prior needs a latent variant")
    inst = make(variant, **sizes)
    net = inst.modules["net"]
    alone = batch([(3, 2)], gen_seed=5)
    padded = batch([(3, 2), (6, 5)], gen_seed=5)  # same first sentence, padded to S=6, T=6
    assert padded[0].shape[1] > alone[0].shape[1] and padded[2].shape[1] > alone[2].shape[1]
    torch.testing.assert_close(padded[0][0, :3], alone[0][0])
    torch.testing.assert_close(padded[2][0, :3], alone[2][0])
    one = log_marginal(net, *alone)["log_lik"].sum(-1)
    two = log_marginal(net, *padded)["log_lik"].sum(-1)
    torch.testing.assert_close(two[0], one[0], rtol=1e-12, atol=0)
    if variant in ("exact", "soft"):  # the training objective too (deterministic for these)
        elbo = TraceEnum_ELBO(max_plate_nesting=2)
        l1 = elbo.differentiable_loss(inst.model, inst.guide, *alone, None)
        torch.testing.assert_close(-l1, one.sum(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------ jump prior
def test_jump_prior_is_the_hmm_predictive_of_the_previous_posterior():
    """With the content scores switched off, each prior is sum_j p(z_{t-1} = j | y_<=t-1) k(i - j) normalized over
    the sentence's positions (a loop over j and i here), from the virtual start j = -1; the exact ELBO is the
    brute-force sum over every joint alignment."""
    inst = make("exact", jump_width=2)
    net = inst.modules["net"]
    with torch.no_grad():
        net.score.weight.zero_()
    args = batch([(4, 3), (3, 2)])
    out = log_marginal(net, *args)
    kernel = net.jump_logits.softmax(-1).tolist()
    k = lambda d: kernel[min(max(d, -2), 2) + 2]  # noqa: E731
    for b, (S, T) in enumerate(zip(args[1].tolist(), args[3].tolist())):
        posterior = None
        for t in range(T):
            if posterior is None:
                weights = [k(i + 1) for i in range(S)]
            else:
                weights = [sum(posterior[j] * k(i - j) for j in range(S)) for i in range(S)]
            expected = torch.tensor([w / sum(weights) for w in weights], dtype=torch.float64)
            torch.testing.assert_close(out["log_prior"][b, t, :S].exp(), expected, rtol=1e-12, atol=0)
            joint = out["log_prior"][b, t, :S].exp() * out["log_emission"][b, t, :S].exp()
            posterior = (joint / joint.sum()).tolist()
    loss = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(inst.model, inst.guide, *args, torch.arange(2),
                                                                  num_data=2)
    torch.testing.assert_close(-loss, brute_force_log_lik(inst, args).sum(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("variant", ["exact", "variational"])
def test_jump_prior_decoding_steps_reproduce_the_likelihood(variant):
    """Teacher-forced decoding steps (AlignmentNet.step fed the previous step's posterior, as greedy and beam search
    feed it) give log p(y_t | x, y_<t) of log_marginal, the training path."""
    from ppl_models.tasks.translation import _posterior, _step_log_probs

    inst = make(variant, jump_width=3)
    net = inst.modules["net"].eval()
    src, src_lengths, tgt, tgt_lengths = batch([(5, 4)], gen_seed=2)
    expected = log_marginal(net, src, src_lengths, tgt, tgt_lengths)["log_lik"][0]
    memory = net.encode(src, src_lengths)
    mask = torch.ones(1, 5, dtype=torch.bool)
    token, state, context, posterior, got = torch.tensor([net.bos_index]), None, None, None, []
    for t in range(int(tgt_lengths[0])):
        hidden, state, prior, context = net.step(token, state, context, memory, mask, posterior)
        log_probs, joint = _step_log_probs(net, memory, hidden, prior, context)
        token = tgt[:, t]
        got.append(log_probs[0, token[0]])
        posterior = _posterior(net, joint, log_probs, torch.arange(1), token)
    torch.testing.assert_close(torch.stack(got), expected[: int(tgt_lengths[0])], rtol=1e-10, atol=0)


def test_jump_prior_rejects_soft_attention_and_input_feeding():
    for variant, feed in (("soft", False), ("exact", True)):
        with pytest.raises(ValueError, match=r"jump_width > 0 needs a latent variant without input feeding.*received "
                                             rf"variant '{variant}' with input_feed = {str(feed).lower()}"):
            make(variant, jump_width=2, input_feed=feed)
    with pytest.raises(ValueError, match=r"jump_width must be an integer >= 0, received -1"):
        make("exact", jump_width=-1)


# ---------------------------------------------------------------------------------------------- gradients
def _flat_grads(params):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _sampled_objective(inst, args) -> torch.Tensor:
    """What the sampled variants' estimator is unbiased for, computed exactly (every z_t summed out by hand):
    sum_t [E_q log p(y_t | z_t) - KL(q(z_t) || p(z_t))] (q = the prior for hard), plus the soft baseline's
    log p_soft(y_t) with baseline "soft" (the model's y_soft factor)."""
    net = inst.modules["net"]
    out = log_marginal(net, *args)
    prior, emission, mask = out["log_prior"], out["log_emission"], out["mask"]
    q = prior
    if net.variant == "variational":
        q = inst.modules["inference"](out["states"].memory, out["states"].src_mask, args[2], args[3])[0]
    per_token = (q.exp() * emission).sum(-1) - (q.exp() * (q - prior)).sum(-1)
    if net.baseline == "soft":
        per_token = per_token + net.soft_log_lik(out["states"], args[2])
    return per_token[mask].sum()


def _score_function_draws(inst, args, idx, passes: int):
    """``(draws (passes, P), params)``: TraceGraph_ELBO's gradient of every parameter but the learned baseline's."""
    params = [p for name, p in inst.modules.named_parameters() if not name.startswith("baseline")]
    graph = TraceGraph_ELBO(max_plate_nesting=2)
    draws = []
    for _ in range(passes):
        for p in inst.modules.parameters():
            p.grad = None
        graph.loss_and_grads(inst.model, inst.guide, *args, idx, num_data=None)  # the batch's own objective
        draws.append(_flat_grads(params))
    return torch.stack(draws), params


@pytest.mark.slow
@pytest.mark.parametrize("baseline", ["soft", "learned"])
@pytest.mark.parametrize("variant", ["variational", "hard"])
def test_reinforce_gradient_is_unbiased_against_the_enumerated_gradient(variant, baseline):
    """TraceGraph_ELBO's score-function gradient (one z_t per step, analytic KL, the soft or a learned baseline)
    averages to the gradient of the same objective with every z_t summed out (:func:`_sampled_objective`).

    Two sentence pairs, each copied 100 times into one batch: one TraceGraph pass averages 100 independent draws
    per pair; 60 passes give the mean and its standard error per gradient coordinate.  Every coordinate is within
    4.5 standard errors (Bonferroni over the ~200 coordinates), and the test has power: the median standard error
    of the stochastic coordinates is below 1/9 of the median |gradient|, so a bias of half a typical coordinate
    would fail it.
    """
    torch.manual_seed(0)
    inst = make(variant, baseline=baseline)
    copies, passes = 100, 60
    args = batch([(3, 2), (2, 3)] * copies, gen_seed=3)
    idx = torch.arange(args[0].shape[0])
    if baseline == "learned":
        with torch.no_grad():  # a baseline that is neither zero nor the answer
            for p in inst.modules["baseline"].parameters():
                p.mul_(0.1)
    else:
        assert "baseline" not in inst.modules

    draws, params = _score_function_draws(inst, args, idx, passes)
    for p in inst.modules.parameters():
        p.grad = None
    (-_sampled_objective(inst, args)).backward()
    exact = _flat_grads(params)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(passes)
    moving = se > 1e-10  # coordinates the score function reaches
    assert int(moving.sum()) > 20
    z = ((mean - exact)[moving] / se[moving]).abs()
    assert float(z.max()) < 4.5, f"max |z| = {float(z.max()):.2f}"
    assert float(se[moving].median() / exact[moving].abs().median()) < 0.5 / 4.5
    torch.testing.assert_close(mean[~moving], exact[~moving], rtol=1e-8, atol=1e-10)  # deterministic coordinates


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["variational", "hard"])
def test_soft_baseline_has_lower_gradient_variance_than_a_fitted_learned_baseline(variant):
    """On one fixed batch (20 sentence pairs) and the same network weights, the total variance (summed over the
    network's coordinates) of the score-function gradient with Deng et al.'s soft baseline is below that with the
    learned per-token baseline — after the learned one was fitted to this very batch (300 Adam steps on its
    squared error), its best case."""
    variances = {}
    args = batch([(3, 2), (2, 3), (4, 4), (5, 3)] * 5, gen_seed=3)
    idx = torch.arange(args[0].shape[0])
    for baseline in ("soft", "learned"):
        pyro.clear_param_store()
        torch.manual_seed(0)
        inst = make(variant, baseline=baseline)
        if baseline == "learned":
            graph = TraceGraph_ELBO(max_plate_nesting=2)
            optim = torch.optim.Adam(inst.modules["baseline"].parameters(), lr=0.05)
            for _ in range(300):
                for p in inst.modules.parameters():
                    p.grad = None
                graph.loss_and_grads(inst.model, inst.guide, *args, idx)
                optim.step()  # the baseline only: the network keeps its weights
        draws, _ = _score_function_draws(inst, args, idx, 150)
        variances[baseline] = float(draws.var(0).sum())
    assert variances["soft"] < 0.7 * variances["learned"], variances


# --------------------------------------------------------------------------------------- synthetic alignment
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["exact", "variational", "variational-enum"])
def test_posterior_argmax_recovers_gold_alignments_on_the_synthetic_task(variant):
    """128 steps of training (examples/configs/attention_synthetic.toml: 1000 reverse-and-transliterate pairs,
    4 epochs) in a few seconds; the argmax of the exact posterior p(z_t | x, y) (and of q(z_t | x, y) for the
    variational variants) matches the gold alignment of >= 90% of the 200 held-out sentences' target tokens."""
    config = REPO / "examples/configs/attention_synthetic.toml"
    experiment = Experiment.from_file(config, {"model.variant": variant, "train.progress": False}, run_dir=None)
    experiment.resolve_model_hooks()
    splits = experiment.load_data()
    instance = experiment.build(splits["train"].num_data, splits["train"].model_kwargs)
    experiment.trainer(splits, instance, run_dir=None).fit()
    guide_modules = {k: m for k, m in instance.modules.items() if k != "net"}
    m = evaluate_alignment(instance.modules["net"], splits["test"], guide_modules=guide_modules).metrics
    assert m["align_accuracy_posterior"] >= 0.9, m
    if variant != "exact":
        assert m["align_accuracy_guide"] >= 0.9, m


def test_plateau_halving_and_early_stopping_follow_the_exact_validation_log_likelihood():
    """The training protocol: validation by the exact log p(y | x) (the task's validation_loss, as
    evaluate_alignment computes it), the learning rate halved at each validation not better than the best before it,
    and training stopped after early_stopping such validations in a row; the trainer then holds the parameters of
    the best validation, not the last."""
    from ppl_models.infer.schedules import plateau_halvings, validations_since_best

    assert plateau_halvings([-3.0, -2.0, -2.5, -2.0, -1.0, float("nan"), -1.5]) == 3
    assert validations_since_best([-3.0, -1.0, -2.0, -1.0]) == 2 and validations_since_best([]) == 0
    config = REPO / "examples/configs/attention_tiny.toml"
    overrides = {"train.validate": True, "train.lr_schedule": "plateau", "train.early_stopping": 3,
                 "train.valid_every": 2, "train.num_epochs": 30, "train.lr": 0.05, "train.progress": False}
    experiment = Experiment.from_file(config, overrides, run_dir=None)
    experiment.resolve_model_hooks()
    splits = experiment.load_data()
    instance = experiment.build(splits["train"].num_data, splits["train"].model_kwargs)
    factors = []
    trainer = experiment.trainer(splits, instance, run_dir=None,
                                 callback=lambda t, step, loss: factors.append((step, t.lr_factor())))
    result = trainer.fit()
    scores = result.history["valid_step_elbo"]
    assert result.history["valid_step"] == list(range(2, result.step + 1, 2))
    for step, factor in factors:  # the factor after each step: 1/2 per non-improving validation up to it
        assert factor == 0.5 ** plateau_halvings(scores[: step // 2])
    assert plateau_halvings(scores) > 0
    assert result.step < 30 * trainer.num_batches and validations_since_best(scores) == 3  # stopped early
    exact = evaluate_alignment(instance.modules["net"], splits["valid"]).metrics
    torch.testing.assert_close(trainer.validation_elbo(), -exact["nll_per_sentence"], rtol=1e-5, atol=0)
    best = max(range(len(scores)), key=scores.__getitem__)
    assert scores[-1] < scores[best] and result.best_step == result.history["valid_step"][best] < result.step
    assert math.isclose(scores[best], trainer.validation_elbo(), rel_tol=1e-6)  # the best parameters, restored


def test_a_run_stopped_early_is_evaluated_and_aligned_with_its_best_parameters(tmp_path):
    """Early stopping keeps the best validation's parameters in every checkpoint: the fit's own evaluation,
    ``ppl-models evaluate`` (the newest checkpoint) and ``align`` (load_aligner) all use them, and metrics.json
    names their step, not the last one."""
    from ppl_models.tasks.alignment import load_aligner

    config = REPO / "examples/configs/attention_tiny.toml"
    overrides = {"train.validate": True, "train.lr_schedule": "plateau", "train.early_stopping": 3,
                 "train.valid_every": 2, "train.num_epochs": 30, "train.lr": 0.05, "train.progress": False,
                 "output.plots": False}
    result, metrics = Experiment.from_file(config, overrides, run_dir=tmp_path / "run").fit()
    scores = result.history["valid_step_elbo"]
    assert result.best_step == result.history["valid_step"][scores.index(max(scores))] < result.step
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["checkpoint_step"] == result.best_step
    again = Experiment.from_run_dir(tmp_path / "run").evaluate()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["checkpoint_step"] == result.best_step
    assert again.to_metrics()["perplexity"] == metrics.to_metrics()["perplexity"]
    experiment = Experiment.from_run_dir(tmp_path / "run")
    experiment.resolve_model_hooks()
    valid = experiment.load_data()["valid"]
    aligner = load_aligner(experiment)
    nll = evaluate_alignment(aligner.net, valid).metrics["nll_per_sentence"]
    assert math.isclose(-nll, max(scores), rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------- bad input
def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_parallel_text_errors_name_the_file_and_line(tmp_path):
    src = _write(tmp_path / "a.src", ["a b c", "d e"])
    tgt = _write(tmp_path / "a.tgt", ["x y", "", ])
    with pytest.raises(TextDataError, match=r"a\.tgt, line 2: expected at least one token"):
        parallel_splits(source=str(src), target=str(tgt))
    tgt = _write(tmp_path / "b.tgt", ["x y", "z", "w"])
    with pytest.raises(TextDataError, match=r"same number of lines, received 2 in .*a\.src and 3 in .*b\.tgt"):
        parallel_splits(source=str(src), target=str(tgt))
    tgt = _write(tmp_path / "c.tgt", ["x y", "z w v u"])
    with pytest.raises(TextDataError, match=r"c\.tgt, line 2: expected at most 3 tokens, received 4"):
        parallel_splits(source=str(src), target=str(tgt), max_len=3)
    splits = parallel_splits(source=str(src), target=str(tgt), max_len=3, on_long="skip")
    assert splits["train"].num_data == 1 and splits["train"].lines == [1]


def test_unknown_tokens_at_evaluation_map_to_unk_or_raise(tmp_path):
    src = _write(tmp_path / "train.src", ["a b c", "a b"])
    tgt = _write(tmp_path / "train.tgt", ["x y", "y z"])
    vsrc = _write(tmp_path / "test.src", ["a NEW"])
    vtgt = _write(tmp_path / "test.tgt", ["x y"])
    splits = parallel_splits(source=str(src), target=str(tgt), test_source=str(vsrc), test_target=str(vtgt))
    test = splits["test"]
    assert test.src[0] == [test.src_vocab.stoi["a"], test.src_vocab.unk_index]
    with pytest.raises(TextDataError, match=r"test\.src, line 1, token 1: 'NEW' is not in the vocabulary"):
        parallel_splits(source=str(src), target=str(tgt), test_source=str(vsrc), test_target=str(vtgt), unk="error")


def test_model_rejects_bad_batches_with_one_clear_error():
    inst = make("exact")
    src, sl, tgt, tl = batch([(3, 2), (2, 2)])
    with pytest.raises(ShapeError, match=r"site 'tgt': expected token indices in \[0, 10\]"):
        inst.model(src, sl, tgt + 20, tl)
    with pytest.raises(ShapeError, match=r"site 'src_lengths': expected lengths in \[1, 3\]"):
        inst.model(src, sl + 5, tgt, tl)
    with pytest.raises(ShapeError, match=r"site 'src': expected a tensor of token indices of shape \(batch, length\)"):
        inst.model(src[0], sl, tgt, tl)
    with pytest.raises(ShapeError, match=r"site 'tgt': expected an integer tensor"):
        inst.model(src, sl, tgt.double(), tl)


def test_variant_fixes_its_elbo_and_guide(tmp_path):
    config = REPO / "examples/configs/attention_tiny.toml"
    exp = Experiment.from_file(config, {"model.variant": "variational"}, run_dir=tmp_path)
    exp.resolve_model_hooks()
    assert (exp.config.train.elbo, exp.config.guide.name) == ("TraceGraph_ELBO", "inference-network")
    exp = Experiment.from_file(config, {"model.variant": "hard", "train.elbo": "TraceEnum_ELBO"}, run_dir=tmp_path)
    with pytest.raises(ConfigError, match="variant 'hard' trains with \\[train\\].elbo = 'TraceGraph_ELBO'"):
        exp.resolve_model_hooks()
    exp = Experiment.from_file(config, {"model.variant": "nope"}, run_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        exp.resolve_model_hooks()


# ----------------------------------------------------------------------------------------- data, CLI, example
def test_synthetic_task_gold_alignments_reverse_the_source():
    src, tgt, align = synthetic_pairs(20, vocab_size=12, min_len=2, max_len=6)
    for s, t, a in zip(src, tgt, align):
        assert len(set(s)) == len(s) and len(t) == len(s)
        for i, j in a:
            assert t[j] == "t" + s[i][1:]


def test_epoch_order_is_a_permutation_with_full_batches_first():
    data = synthetic_splits(num_train=103, num_valid=1, num_test=1, vocab_size=12, max_len=8)["train"]
    order = data.epoch_order(10, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(103))
    spans = [data._lengths[order[i : i + 10]] for i in range(0, 100, 10)]
    assert sum(int(s.max() - s.min()) for s in spans) <= 10  # sorted within pools: batches of near-equal length


@pytest.mark.slow
def test_cli_fit_then_align_writes_pharaoh_lines(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli_main(["fit", str(REPO / "examples/configs/attention_tiny.toml"), "--run-dir", str(run_dir),
                     "--no-progress", "-o", "model.variant=variational-enum", "-o", "output.plots=false"])
    assert code == 0
    src, tgt, _ = synthetic_pairs(3, vocab_size=10, min_len=2, max_len=5)
    s = _write(tmp_path / "x.src", [" ".join(t) for t in src])
    t = _write(tmp_path / "x.tgt", [" ".join(t) for t in tgt])
    capsys.readouterr()
    assert cli_main(["align", str(run_dir), str(s), str(t)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line, s_tok, t_tok in zip(lines, src, tgt):
        pairs = [tuple(map(int, p.split("-"))) for p in line.split()]
        assert [j for _, j in pairs] == list(range(len(t_tok)))
        assert all(0 <= i < len(s_tok) for i, _ in pairs)
    out = tmp_path / "x.align"
    assert cli_main(["align", str(run_dir), str(s), str(t), "-o", str(out), "--links", "q"]) == 0
    assert len(out.read_text().splitlines()) == 3
    bad = _write(tmp_path / "y.tgt", [" ".join(t) for t in tgt[:2]])
    assert cli_main(["align", str(run_dir), str(s), str(bad)]) == 2
    assert "expected the same number of lines" in capsys.readouterr().err


def test_aligner_links_argmax_null_threshold_and_q():
    """TrainedAligner.links: an argmax gives every target word (never <eos>) one link; with a threshold a word whose
    best posterior is not above it stays unaligned (NULL); "threshold" links every position above it; "q" reads the
    inference network; unknown words become <unk>."""
    from ppl_models.data.text import Vocab
    from ppl_models.tasks.alignment import TrainedAligner

    inst = make("variational-enum")
    net = inst.modules["net"]
    src_vocab = Vocab([f"s{k}" for k in range(SRC_V - 4)])
    tgt_vocab = Vocab([f"t{k}" for k in range(TGT_V - 4)])
    aligner = TrainedAligner(net, {"inference": inst.modules["inference"]}, src_vocab, tgt_vocab, lower=False)
    src = [["s0", "s3", "s1"], ["s2", "NEW"], ["s4", "s0", "s1", "s2"]]
    tgt = [["t1", "t5"], ["t0", "t6", "t2"], ["t3"]]
    ids = [(src_vocab.encode(s), tgt_vocab.encode(t) + [tgt_vocab.eos_index]) for s, t in zip(src, tgt)]
    posteriors = []
    for s_ids, t_ids in ids:
        out = log_marginal(net, torch.tensor([s_ids]), torch.tensor([len(s_ids)]), torch.tensor([t_ids]),
                           torch.tensor([len(t_ids)]))
        posteriors.append(out["log_posterior"][0, :-1].exp().detach())  # without <eos>
    argmax = aligner.links(src, tgt)
    for links, post, t in zip(argmax, posteriors, tgt):
        assert sorted(j for _, j in links) == list(range(len(t)))
        assert all(int(post[j].argmax()) == i for i, j in links)
    tau = float(torch.cat([p.max(-1).values for p in posteriors]).median())
    nulls = aligner.links(src, tgt, "posterior", tau)
    kept = sum(len(x) for x in nulls)
    assert 0 < kept < sum(len(x) for x in argmax)
    for links, null, post in zip(argmax, nulls, posteriors):
        assert null == {(i, j) for i, j in links if float(post[j, i]) > tau}
    for links, post in zip(aligner.links(src, tgt, "threshold", 0.2), posteriors):
        assert links == {(int(i), int(j)) for j, i in (post > 0.2).nonzero().tolist()}
    q_links = aligner.links(src, tgt, "q")
    assert [sorted(j for _, j in x) for x in q_links] == [list(range(len(t))) for t in tgt]
    with pytest.raises(ValueError, match=r"--threshold: expected a probability in \[0, 1\)"):
        aligner.links(src, tgt, "threshold", 1.5)


@pytest.mark.slow
def test_cli_align_a_trained_run_lowercases_reports_unknowns_and_scores_gold(tmp_path, shared_data, capsys):
    """An alignment run trained on the lowercased Hansards test text: ``ppl-models align`` reads its vocabularies
    and lowercasing from vocab.json (no corpus reload), lowercases the cased trial text, reports the <unk> rate that
    the lowercased text has, aligns both directions and scores the gold."""
    from ppl_models.data.hansards import hansards_text
    from ppl_models.data.text import read_parallel

    h = shared_data / "hansards_align"
    runs = {}
    for name, (s, t) in {"ef": ("e", "f"), "fe": ("f", "e")}.items():
        runs[name] = tmp_path / name
        config = tmp_path / f"{name}.toml"
        config.write_text(f"""
[model]
name = "alignment"
variant = "exact"
emb_dim = 8
hidden_dim = 8
[data]
name = "parallel"
source = "{h / f'test.{s}.gz'}"
target = "{h / f'test.{t}.gz'}"
lower = true
[train]
batch_size = 64
num_epochs = 1
validate = false
[output]
plots = false
""")
        assert cli_main(["fit", str(config), "--run-dir", str(runs[name]), "--no-progress", "--no-evaluate"]) == 0
        assert json.loads((runs[name] / "vocab.json").read_text())["lower"] is True
    raw_en, raw_fr = read_parallel(h / "dev.e.gz", h / "dev.f.gz")
    assert any(w != w.lower() for s in raw_en for w in s)  # the trial text is cased
    vocab = json.loads((runs["ef"] / "vocab.json").read_text())
    known = set(vocab["src"]["itos"])
    trial_en, _ = hansards_text("trial", data_dir=shared_data)  # lowercased
    unknown = sum(w not in known for s in trial_en for w in s)
    capsys.readouterr()
    out = tmp_path / "trial.align"
    assert cli_main(["align", str(runs["ef"]), str(h / "dev.e.gz"), str(h / "dev.f.gz"), "--reverse", str(runs["fe"]),
                     "--symmetrize", "grow-diag-final", "--gold", str(h / "dev.wa.nonullalign.gz"), "-o", str(out),
                     "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"forward: alignment (exact): source {unknown}/{sum(map(len, trial_en))} " in err, err
    assert "note:" not in err  # nothing about the training data: it was not reloaded
    names = [line.split()[0] for line in err.splitlines() if line.split()]
    assert {"forward", "reverse", "grow-diag-final"} <= set(names), err
    assert len(out.read_text().splitlines()) == 37


@pytest.mark.slow
def test_example_runs_with_tiny_flags(tmp_path):
    sys.path.insert(0, str(REPO / "examples"))
    import attention_multi30k
    from argparse import Namespace

    args = Namespace(config=str(REPO / "examples/configs/attention_tiny.toml"), variants=["soft", "hard"],
                     max_steps=2, num_epochs=None, time_limit=None, limit_train=None, limit_test=8, seed=0, baseline=None,
                     data_dir=None, run_root=str(tmp_path), resume=False, table_only=False, no_progress=True)
    rows = attention_multi30k.main(args)
    assert set(rows) == {"soft", "hard"} and rows["hard"]["train_steps"] == 2 and rows["soft"]["num_data"] == 8
    assert (tmp_path / "summary.md").read_text().count("\n") == 4
    for name in ("alignments.png", "translations.txt", "metrics.json", "summary.json"):
        assert (tmp_path / "hard" / name).is_file(), name


@pytest.mark.slow
def test_multi30k_loader_builds_the_configured_vocabularies(shared_data):
    from ppl_models.data.parallel import multi30k_splits

    splits = multi30k_splits("en", "fr", data_dir=str(shared_data), download=False)
    assert (splits["valid"].num_data, splits["test"].num_data) == (1014, 1000)
    assert splits["train"].num_data == 29000 - 158  # pairs over 30 tokens skipped
    assert splits["train"].model_kwargs == {"src_vocab_size": 5917 + 4, "tgt_vocab_size": 6478 + 4}


@pytest.mark.slow
def test_multi30k_with_the_hansards_text_appended_in_either_direction(shared_data):
    """[data] extra_train appends the Hansards test and trial text (lowercased) to Multi30k's training pairs, in the
    run's direction, and the vocabularies cover it; an unknown name or a non en/fr pair is one error."""
    from ppl_models.data.hansards import hansards_text
    from ppl_models.data.parallel import multi30k_splits

    extra = ["hansards:test", "hansards:trial"]
    base = multi30k_splits("en", "fr", data_dir=str(shared_data), download=False, min_freq=1, vocab_size=30000)
    splits = multi30k_splits("fr", "en", data_dir=str(shared_data), download=False, min_freq=1, vocab_size=30000,
                             extra_train=extra)
    train = splits["train"]
    assert train.num_data == base["train"].num_data + 447 + 37 and train.lower
    trial_en, trial_fr = hansards_text("trial", data_dir=shared_data)
    assert train.src_vocab.decode(train.src[-1]) == trial_fr[-1]  # French is the source of fr -> en
    assert train.tgt_vocab.decode(train.tgt[-1]) == trial_en[-1]
    assert all(w in train.src_vocab for s in trial_fr for w in s)
    with pytest.raises(TextDataError, match="extra_train: unknown text 'hansards:dev'; valid: hansards:test"):
        multi30k_splits("en", "fr", data_dir=str(shared_data), download=False, extra_train=["hansards:dev"])
    with pytest.raises(TextDataError, match="is English-French text, the languages are 'en' and 'de'"):
        multi30k_splits("en", "de", data_dir=str(shared_data), download=False, extra_train=extra)


@pytest.mark.slow
def test_benchmark_quick_run_reports_json():
    import json
    import subprocess

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_alignment.py"), "--quick", "--simulated"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "alignment_step"
    assert set(result["time_ratio_vs_soft"]) == set(VARIANTS) and result["time_ratio_vs_soft"]["soft"] == 1.0
    assert set(result["goal_met"]) == {"variational", "exact"}
