r"""Translation with a trained latent-alignment model (:mod:`ppl_models.alignment`): greedy and beam-search
decoding and corpus BLEU, for the alignment task's evaluation (:func:`ppl_models.tasks.alignment.evaluate`).

* :func:`greedy_decode`, :func:`beam_decode` — left to right with :meth:`ppl_models.alignment.AlignmentNet.step`
  (input feeding included), :math:`\log p(y_t \mid x, y_{<t})` of each variant: soft attention's softmax, or the
  latent variants' sum over the alignment :math:`\sum_i p(z_t = i)\, p(y_t \mid z_t = i)`;
* :func:`corpus_bleu` — corpus BLEU (Papineni et al. 2002), one reference, on tokens, by sacreBLEU (its signature:
  :func:`bleu_signature`);
* :func:`translate_split` — both on a split, its BLEU and a few examples.

References:
    Papineni, Roukos, Ward & Zhu (2002), BLEU: a Method for Automatic Evaluation of Machine Translation.
    Post (2018), A Call for Clarity in Reporting BLEU Scores (sacreBLEU).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ppl_models.alignment import AlignmentNet
from ppl_models.atomic import atomic_write_bytes

__all__ = ["greedy_decode", "beam_decode", "corpus_bleu", "bleu_signature", "translate_split"]


def _eval_batches(dataset, batch_size: int):
    """Index batches of similar lengths, in a fixed order."""
    order = sorted(range(dataset.num_data), key=lambda i: (len(dataset.src[i]), len(dataset.tgt[i])))
    for start in range(0, len(order), batch_size):
        yield torch.tensor(order[start : start + batch_size])


def _step_log_probs(net: AlignmentNet, memory, hidden, prior, context):
    """``log p(y_t | x, y_<t)`` ``(N, V)`` from a decoder step (:meth:`AlignmentNet.step`): ``hidden`` ``(N, H)``,
    ``prior`` logits ``(N, S)``, soft ``context`` ``(N, 2H)``; and for the latent variants the joint
    ``log p(z_t = i, y_t = v | x, y_<t)`` ``(N, S, V)`` (``None`` for soft)."""
    if net.variant == "soft":
        return net.out(net.out_hidden(hidden) + net.out_memory(context)).log_softmax(-1), None
    a = net.logits_hidden(hidden)[:, None, :]  # (N, 1, V)
    b = net.logits_memory(memory)  # (N, S, V)
    joint = prior[..., None] + (a + b).log_softmax(-1)
    return joint.logsumexp(1), joint


def _posterior(net: AlignmentNet, joint, log_probs, rows, tokens):
    """With a jump prior, the log posterior ``log p(z_t | x, y_<=t)`` ``(N, S)`` of hypotheses ``rows`` ``(N,)``
    given their chosen ``tokens`` ``(N,)``, for the next step's prior; ``None`` without one."""
    if not net.jump_width:
        return None
    return joint[rows, :, tokens] - log_probs[rows, tokens][:, None]


@torch.no_grad()
def greedy_decode(net: AlignmentNet, src, src_lengths, max_len: int = 60, eos_index: int = 3):
    """Greedy translations: a list of index lists (``<eos>`` removed), one per source sentence; at most
    ``min(max_len, 2 S + 10)`` tokens for the batch's longest source length ``S``."""
    net.eval()
    max_len = min(max_len, 2 * int(src_lengths.max()) + 10)
    memory = net.encode(src, src_lengths)
    src_mask = torch.arange(src.shape[1]) < src_lengths[:, None]
    batch = src.shape[0]
    token = torch.full((batch,), net.bos_index, dtype=torch.long)
    state = context = posterior = None
    out = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    for _ in range(max_len):
        hidden, state, prior, context = net.step(token, state, context, memory, src_mask, posterior)
        log_probs, joint = _step_log_probs(net, memory, hidden, prior, context)
        token = log_probs.argmax(-1)
        posterior = _posterior(net, joint, log_probs, torch.arange(batch), token)
        for i in range(batch):
            if not done[i]:
                if int(token[i]) == eos_index:
                    done[i] = True
                else:
                    out[i].append(int(token[i]))
        if bool(done.all()):
            break
    return out


@torch.no_grad()
def beam_decode(net: AlignmentNet, src, src_length: int, beam_size: int = 5, max_len: int = 60, eos_index: int = 3):
    """Beam search for one source sentence ``src`` ``(S,)``: the finished hypothesis of highest log-probability
    (``<eos>`` removed), at most ``min(max_len, 2 S + 10)`` tokens.  Search stops when no live hypothesis scores above
    the best finished one (scores only fall)."""
    net.eval()
    max_len = min(max_len, 2 * src_length + 10)
    src = src[None, :src_length]
    memory = net.encode(src, torch.tensor([src_length]))
    src_mask = torch.ones(1, src_length, dtype=torch.bool)
    # (tokens, score, decoder state, last token, soft context, log posterior of the last step (jump prior))
    beams = [([], 0.0, None, net.bos_index, None, None)]
    best = None  # (tokens, score) of the best finished hypothesis
    for _ in range(max_len):
        tokens = torch.tensor([b[3] for b in beams])
        states = None if beams[0][2] is None else torch.cat([b[2] for b in beams], dim=1)
        contexts = None if beams[0][4] is None else torch.cat([b[4] for b in beams], dim=0)
        posteriors = None if beams[0][5] is None else torch.cat([b[5] for b in beams], dim=0)
        k = len(beams)
        mem, mask = memory.expand(k, -1, -1), src_mask.expand(k, -1)
        hidden, new_state, prior, new_context = net.step(tokens, states, contexts, mem, mask, posteriors)
        log_probs, joint = _step_log_probs(net, mem, hidden, prior, new_context)
        scores = torch.tensor([b[1] for b in beams])[:, None] + log_probs
        top, flat = scores.flatten().topk(min(beam_size + 1, scores.numel()))
        candidates = []
        for score, f in zip(top.tolist(), flat.tolist()):
            b, v = divmod(f, log_probs.shape[1])
            if v == eos_index:
                if best is None or score > best[1]:
                    best = (beams[b][0], score)
            elif len(candidates) < beam_size:
                posterior = _posterior(net, joint, log_probs, torch.tensor([b]), torch.tensor([v]))
                candidates.append((beams[b][0] + [v], score, new_state[:, b : b + 1], v, new_context[b : b + 1],
                                   posterior))
        if not candidates or (best is not None and candidates[0][1] <= best[1]):
            break
        beams = candidates
    if best is None:
        best = max(((b[0], b[1]) for b in beams), key=lambda h: h[1])
    return best[0]


def _bleu(max_n: int = 4):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="none", max_ngram_order=max_n)  # the text is tokenized already


def corpus_bleu(hypotheses, references, max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002) in percent, one reference per sentence, on token lists (ids or strings),
    computed by sacreBLEU (Post 2018) on the tokens joined by spaces: ``tokenize="none"``, its default exponential
    smoothing (which changes nothing unless some n-gram order has no match in the whole corpus); the signature
    that papers report is :func:`bleu_signature`."""
    hyps = [" ".join(map(str, h)) for h in hypotheses]
    refs = [[" ".join(map(str, r)) for r in references]]
    return float(_bleu(max_n).corpus_score(hyps, refs).score)


def bleu_signature(max_n: int = 4) -> str:
    """sacreBLEU's signature of :func:`corpus_bleu`, e.g. ``nrefs:1|case:mixed|eff:no|tok:none|smooth:exp|version:2.6.0``."""
    bleu = _bleu(max_n)
    bleu.corpus_score(["a"], [["a"]])  # the reference count enters the signature once a score was computed
    return str(bleu.get_signature())


@torch.no_grad()
def translate_split(net: AlignmentNet, dataset, path=None, *, beam_size: int = 5, num_beam: int = 100,
                    batch_size: int = 64, progress: bool = True) -> dict:
    """Greedy translations of the whole split and beam search on its first ``num_beam`` sentences; corpus BLEU of
    both (against the one reference, on tokens, ``<unk>`` counted as a token); the first 20 written to ``path``.
    ``progress``: a bar per decoding pass (on stderr)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    vocab = dataset.tgt_vocab
    greedy = [None] * dataset.num_data
    with tqdm(total=dataset.num_data, desc="greedy decoding", unit="sent", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for idx in _eval_batches(dataset, batch_size):
            src, src_lengths, _, _ = dataset.batch(idx)
            for i, hyp in zip(idx.tolist(), greedy_decode(net, src, src_lengths, eos_index=vocab.eos_index)):
                greedy[i] = hyp
            bar.update(len(idx))
    n_beam = min(num_beam, dataset.num_data)
    beam = [beam_decode(net, torch.tensor(dataset.src[i]), len(dataset.src[i]), beam_size, eos_index=vocab.eos_index)
            for i in tqdm(range(n_beam), desc=f"beam search ({beam_size})", unit="sent", disable=not progress,
                          leave=False, dynamic_ncols=True)]
    refs = [t[:-1] for t in dataset.tgt]
    out = {
        "bleu_greedy": corpus_bleu(greedy, refs),
        "bleu_beam": corpus_bleu(beam, refs[:n_beam]),
        "bleu_greedy_same_sentences": corpus_bleu(greedy[:n_beam], refs[:n_beam]),
        "bleu_signature": bleu_signature(),
        "beam_size": beam_size,
        "num_beam_sentences": n_beam,
        "decode_wall_time_s": time.perf_counter() - start,
    }
    if path is not None:
        lines = []
        for i in range(min(20, n_beam)):
            lines += [f"src:    {' '.join(dataset.src_vocab.decode(dataset.src[i]))}",
                      f"ref:    {' '.join(vocab.decode(dataset.tgt[i]))}",
                      f"greedy: {' '.join(vocab.decode(greedy[i]))}",
                      f"beam{beam_size}:  {' '.join(vocab.decode(beam[i]))}", ""]
        text = "\n".join(lines).encode()
        atomic_write_bytes(Path(path), lambda f: f.write(text))
    return out
