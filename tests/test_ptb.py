"""PTB loader, bigram and LSTM language models, the token distribution, word dropout and KL annealing schedules."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from ppl_models import registry
from ppl_models.bigram import BigramTransitions
from ppl_models.data.ptb import PTB_VOCAB_SIZE, SentenceDataset, encode_sentences, ptb_splits
from ppl_models.data.text import TextDataError, Vocab
from ppl_models.infer.annealing import MIN_WEIGHT, AnnealedTrainer, KLSchedule
from ppl_models.distributions import TokenCategorical
from ppl_models.encodings import BOS_INDEX, EOS_INDEX, PAD_INDEX, UNK_INDEX
from ppl_models.lstm_lm import shift_inputs, word_dropout
from ppl_models.spec import ShapeError

V = 9  # 4 specials + 5 words


def _sentence_log_lik(model, tokens, lengths):
    """Per-sentence log p(x) of a model without latents: the observed site's masked log-density."""
    site = poutine.trace(model).get_trace(tokens, lengths, None).nodes["x"]
    return site["fn"].log_prob(site["value"])


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def ptb(shared_data):
    return ptb_splits(str(shared_data))


def test_ptb_splits_mikolov(ptb):
    vocab = ptb["train"].vocab
    # Mikolov's 10k types (9,999 words incl. <unk>) plus <eos> are predicted; <pad> and <bos> never are.
    assert len(vocab) == PTB_VOCAB_SIZE + 2
    assert [ptb[s].num_data for s in ("train", "valid", "test")] == [42068, 3370, 3761]
    assert ptb["train"].num_tokens == 887521 + 42068  # words + one <eos> per sentence
    assert ptb["test"].num_tokens == 82430
    for split in ("train", "test"):
        data = ptb[split]
        assert all(seq[-1] == EOS_INDEX and EOS_INDEX not in seq[:-1] for seq in data.sequences)
        assert all(PAD_INDEX not in seq and BOS_INDEX not in seq for seq in data.sequences)
    # evaluation splits are sorted by length (little padding per batch)
    assert torch.equal(ptb["test"].lengths, torch.sort(ptb["test"].lengths).values)
    tokens, lengths = ptb["test"].batch(torch.tensor([0, 3760]))
    assert tokens.shape == (2, int(lengths.max())) and tokens[0, lengths[0]:].eq(PAD_INDEX).all()


def test_ptb_overlong_sentence_is_one_clear_error(shared_data):
    with pytest.raises(TextDataError, match=r"ptb\.train\.txt.*line \d+: expected at most 50 tokens, received \d+"):
        ptb_splits(str(shared_data), max_len=50)


def test_oov_maps_to_unk_and_overlong_raises():
    vocab = Vocab(["a", "b"])
    assert encode_sentences([["a", "zzz", "b"]], vocab, max_len=5) == [
        [vocab.stoi["a"], UNK_INDEX, vocab.stoi["b"], EOS_INDEX]
    ]
    with pytest.raises(TextDataError, match=r"valid, line 2: expected at most 2 tokens, received 3"):
        encode_sentences([["a"], ["a", "b", "a"]], vocab, max_len=2, where="valid")
    with pytest.raises(TextDataError, match="at least one sentence"):
        SentenceDataset([], vocab)


def test_length_batches_cover_every_sentence_once():
    vocab = Vocab(["a"])
    data = SentenceDataset([[4] * n + [EOS_INDEX] for n in range(1, 101)], vocab)
    batches = data.length_batches(8, torch.Generator().manual_seed(0))
    seen = torch.cat(batches).sort().values
    assert torch.equal(seen, torch.arange(100))


# ------------------------------------------------------------------------------------------ bad input
def test_sequence_models_reject_bad_input():
    kwargs = {"vocab_size": V, "embed_dim": 3, "hidden_dim": 4}
    inst = registry.instantiate("lstm-lm", "empty", num_data=2, model_kwargs=kwargs)
    tokens = torch.tensor([[4, 5, EOS_INDEX]])
    with pytest.raises(ShapeError, match="'x'.*integer tensor"):
        inst.model(tokens.float(), torch.tensor([3]))
    with pytest.raises(ShapeError, match=r"'x'.*lengths in \[1, 3\].*received 4"):
        inst.model(tokens, torch.tensor([4]))
    with pytest.raises(ShapeError, match=r"'x'.*token indices in \[0, 8\], received 9"):
        inst.model(torch.tensor([[4, 9, EOS_INDEX]]), torch.tensor([3]))
    with pytest.raises(ShapeError, match=r"lengths of shape \(1,\)"):
        inst.model(tokens, torch.tensor([3, 3]))


# ------------------------------------------------------------------------------------------ token distribution
def test_token_categorical_equals_categorical():
    logits = torch.randn(3, 5, V, dtype=torch.float64)
    logits[..., [PAD_INDEX, BOS_INDEX]] = float("-inf")
    value = torch.randint(3, V, (3, 5))
    expected = dist.Categorical(logits=logits).log_prob(value)
    assert torch.allclose(TokenCategorical(logits).log_prob(value), expected, atol=1e-12)
    # expanded along a new leading (samples) dim, as the evaluator's plate does
    expanded = TokenCategorical(logits).expand((4, 3, 5))
    assert torch.allclose(expanded.log_prob(value), expected.expand(4, 3, 5), atol=1e-12)


# ------------------------------------------------------------------------------------------ bigram
def test_bigram_is_the_dirichlet_posterior_predictive():
    seqs = [[4, 5, 6, EOS_INDEX], [4, 4, EOS_INDEX], [7, EOS_INDEX]]
    trans = BigramTransitions(V).fit(seqs)
    trans.set_alpha(2.0)
    pairs = [(BOS_INDEX, 4), (4, 5), (5, 6), (6, EOS_INDEX), (BOS_INDEX, 4), (4, 4), (4, EOS_INDEX), (BOS_INDEX, 7),
             (7, EOS_INDEX)]
    counts = torch.zeros(V, V, dtype=torch.float64)
    for v, w in pairs:
        counts[v, w] += 1
    unigram = torch.bincount(torch.tensor([w for _, w in pairs]), minlength=V).double() + 1
    unigram[[PAD_INDEX, BOS_INDEX]] = 0
    unigram /= unigram.sum()
    expected = torch.log((counts + 2.0 * unigram) / (counts.sum(1, keepdim=True) + 2.0))
    rows = trans.log_probs(torch.arange(V)).double()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(rows), finite)
    assert torch.allclose(rows[finite], expected[finite], atol=1e-6)
    assert torch.allclose(rows.exp().sum(-1), torch.ones(V, dtype=torch.float64), atol=1e-6)
    prev, nxt = torch.tensor([4, 4, 8, BOS_INDEX]), torch.tensor([5, 8, 8, 7])
    assert torch.allclose(trans.log_prob_pairs(prev, nxt).double(), expected[prev, nxt], atol=1e-6)

    inst = registry.instantiate("bigram", "empty", num_data=2, model_kwargs={"vocab_size": V})
    inst.modules["transitions"].fit(seqs).set_alpha(2.0)
    tokens, lengths = torch.tensor([[4, 5, 6, EOS_INDEX], [7, EOS_INDEX, 0, 0]]), torch.tensor([4, 2])
    ll = _sentence_log_lik(inst.model, tokens, lengths).double()
    by_hand = torch.stack([
        sum(expected[v, w] for v, w in pairs[:4]),
        expected[BOS_INDEX, 7] + expected[7, EOS_INDEX],
    ])
    assert torch.allclose(ll, by_hand, atol=1e-5)


def test_bigram_choose_alpha_maximizes_validation_likelihood():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 6, (50,), generator=gen)
    seqs = [torch.randint(4, V, (int(n),), generator=gen).tolist() + [EOS_INDEX] for n in lengths]
    trans = BigramTransitions(V).fit(seqs[:40])
    scores = trans.choose_alpha(seqs[40:], grid=(0.5, 2.0, 8.0))
    assert float(trans.alpha) == max(scores, key=scores.get)
    with pytest.raises(ValueError, match="alpha: expected a positive"):
        trans.set_alpha(0.0)


# ------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("name", ["lstm-lm", "bigram"])
def test_padding_never_changes_a_sentence_likelihood(name):
    kwargs = {"vocab_size": V} if name == "bigram" else {"vocab_size": V, "embed_dim": 3, "hidden_dim": 4}
    inst = registry.instantiate(name, "empty", num_data=2, model_kwargs=kwargs)
    if name == "bigram":
        inst.modules["transitions"].fit([[4, 5, EOS_INDEX], [6, 7, 8, EOS_INDEX]])
    alone = _sentence_log_lik(inst.model, torch.tensor([[5, 6, EOS_INDEX]]), torch.tensor([3]))
    # the same sentence beside a longer one, padded with <pad> and then with arbitrary tokens after its end
    for filler in (PAD_INDEX, 7):
        tokens = torch.tensor([[5, 6, EOS_INDEX, filler, filler, filler], [4, 5, 6, 7, 8, EOS_INDEX]])
        padded = _sentence_log_lik(inst.model, tokens, torch.tensor([3, 6]))
        assert torch.allclose(padded[0], alone[0], rtol=0, atol=1e-5)


def test_shift_inputs():
    tokens, lengths = torch.tensor([[4, 5, EOS_INDEX], [6, EOS_INDEX, 0]]), torch.tensor([3, 2])
    inputs, targets, mask = shift_inputs(tokens, lengths)
    assert inputs.tolist() == [[BOS_INDEX, 4, 5], [BOS_INDEX, 6, EOS_INDEX]]
    assert targets.tolist() == [[4, 5, EOS_INDEX], [6, EOS_INDEX, EOS_INDEX]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]


# ------------------------------------------------------------------------------------------ word dropout
@pytest.mark.parametrize("keep", [0.7, 0.25])
def test_word_dropout_rate_matches_its_setting(keep):
    inputs = torch.randint(4, V, (400, 51), generator=torch.Generator().manual_seed(1))
    inputs[:, 0] = BOS_INDEX
    out = word_dropout(inputs, keep, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out[:, 0], inputs[:, 0])  # <bos> is never dropped
    dropped = out[:, 1:] == UNK_INDEX
    assert torch.equal(out[:, 1:][~dropped], inputs[:, 1:][~dropped])  # the rest are untouched
    n = dropped.numel()
    p = 1.0 - keep
    se = math.sqrt(n * p * (1 - p))  # binomial standard error of the count
    assert abs(int(dropped.sum()) - n * p) < 4 * se


def test_word_dropout_edges():
    inputs = torch.randint(4, V, (3, 5))
    assert word_dropout(inputs, 1.0) is inputs
    assert (word_dropout(inputs, 0.0)[:, 1:] == UNK_INDEX).all()
    with pytest.raises(ValueError, match=r"keep rate in \[0, 1\]"):
        word_dropout(inputs, 1.5)


# ------------------------------------------------------------------------------------------ annealing
def test_annealing_schedules_give_the_stated_weights():
    linear = KLSchedule("linear", warmup_steps=4)
    assert [linear(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    sigmoid = KLSchedule("sigmoid", rate=0.5, midpoint=10.0)
    assert sigmoid(10) == 0.5
    assert sigmoid(12) == 1.0 / (1.0 + math.exp(-1.0))
    assert math.isclose(sigmoid(10 + 2 * math.log(3.0)), 0.75, rel_tol=1e-12)
    assert sigmoid(8) == 1.0 / (1.0 + math.exp(1.0))
    assert sigmoid(0) > 0 and KLSchedule("sigmoid", rate=10.0, midpoint=1000.0)(0) == MIN_WEIGHT
    assert KLSchedule("constant")(12345) == 1.0
    with pytest.raises(ValueError, match="expected one of constant, linear, sigmoid, received 'cosine'"):
        KLSchedule("cosine")
    with pytest.raises(ValueError, match="warmup_steps >= 1"):
        KLSchedule("linear", warmup_steps=0)


def test_annealed_trainer_passes_the_scheduled_weight():
    seen = []

    def model(tokens, lengths, idx=None, *, num_data=None, kl_weight=1.0, word_keep=1.0):
        seen.append((kl_weight, word_keep))
        w = pyro.param("w", torch.zeros(()))
        with pyro.plate("data", num_data or tokens.shape[0], subsample=idx):
            pyro.sample("x", dist.Normal(w, 1.0), obs=torch.zeros(idx.shape[0] if idx is not None else tokens.shape[0]))

    def guide(tokens, lengths, idx=None, *, num_data=None, kl_weight=1.0, word_keep=1.0):
        pass

    vocab = Vocab(["a"])
    data = SentenceDataset([[4, EOS_INDEX]] * 4, vocab)
    trainer = AnnealedTrainer(model, guide, data, batch_size=2, progress=False,
                              kl_schedule=KLSchedule("linear", warmup_steps=4), word_keep=0.5)
    for _ in range(3):
        idx = torch.tensor([0, 1])
        seen.clear()
        expected = trainer.kl_schedule(trainer.step)
        trainer.train_step(data.batch(idx), idx)
        assert seen and all(s == (expected, 0.5) for s in seen)
    with pytest.raises(ValueError, match="word_keep"):
        AnnealedTrainer(model, guide, data, progress=False, word_keep=2.0)


# ------------------------------------------------------------------------------------------ the example
@pytest.mark.slow
def test_example_trains_evaluates_resumes_and_tabulates(shared_data, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "ptb_language_models.py"
    spec = importlib.util.spec_from_file_location("ptb_language_models", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    config = str(path.parent / "configs" / "ptb_text_vae_tricks.toml")
    tiny = ["-o", "data.limit_train=64", "-o", "train.max_steps=2", "-o", "train.batch_size=32",
            "-o", "model.embed_dim=8", "-o", "model.hidden_dim=8",
            "-o", "guide.embed_dim=8", "-o", "guide.hidden_dim=8",
            "-o", "evaluate.test_subset=6", "-o", "evaluate.num_samples=2", "-o", "evaluate.big_k_sentences=2",
            "-o", "evaluate.big_num_samples=4", "-o", "evaluate.num_prior_samples=2",
            "-o", f"data.data_dir={shared_data}"]
    run_dir = tmp_path / "vae"
    first = example.main(example.parse_args(["--config", config, "--run-dir", str(run_dir), *tiny]))
    assert first["training"]["steps"] == 2 and first["training"]["stopped_by"] == "max_steps 2"
    assert first["test"]["num_sentences"] == 6 and first["test"]["ppl"] > 1
    assert len(first["text"]["prior_samples"]) == 2
    resumed = example.main(example.parse_args(
        ["--config", config, "--run-dir", str(run_dir), "--resume", *tiny, "-o", "train.max_steps=3",
         "-o", "train.num_epochs=2"]))
    assert resumed["training"]["steps"] == 3  # continued from the checkpoint at step 2 (the end of epoch 1)
    capsys.readouterr()
    text = example.main(example.parse_args(["--table", str(run_dir)]))
    assert "text VAE, KL annealing + word dropout" in text and "| 3 |" in text
    with pytest.raises(example.ConfigError, match=r"\[train\] unknown key 'warmup'"):
        example.main(example.parse_args(["--config", config, "-o", "train.warmup=3"]))
