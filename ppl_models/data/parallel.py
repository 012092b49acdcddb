r"""Parallel text for the latent-alignment models: Multi30k, any source/target file pair, and a synthetic task
with known gold alignments.

A sentence pair is a source sentence :math:`x = x_0 \dots x_{S-1}` and a target sentence
:math:`y = y_0 \dots y_{T-1}`, whitespace-tokenized, one pair per line of two files.  The model's data
arguments for a batch (:meth:`ParallelText.batch`) are

* ``src``  — ``(batch, S_max)`` ``int64`` source indices, padded with ``<pad>`` = 0 (no ``<bos>``/``<eos>``,
  so source position ``i`` is token ``i`` of the line: the ``i`` of a Pharaoh ``i-j`` pair);
* ``src_lengths`` — ``(batch,)`` the source lengths :math:`S`;
* ``tgt``  — ``(batch, T_max)`` target indices followed by ``<eos>``, padded with ``<pad>``;
* ``tgt_lengths`` — ``(batch,)`` the target lengths including ``<eos>`` (:math:`T + 1`).

Handling of bad input (all via :mod:`ppl_models.data.text`, one :class:`~ppl_models.data.text.TextDataError`
naming the file and line):

* an empty line on either side, or source and target files with different numbers of lines: an error;
* a token not in the vocabulary (built from the training split, ``vocab_size`` most frequent types seen at
  least ``min_freq`` times): mapped to ``<unk>`` (``unk="map"``, the default, also at evaluation time), or an
  error naming the token, file and line (``unk="error"``);
* a sentence longer than the limit (``max_len`` for training, ``max_eval_len`` for validation/test/alignment):
  an error naming the file, line and both lengths (``on_long="error"``), or the pair is dropped and the count
  reported on stderr (``on_long="skip"``, for training on a corpus with a few very long lines).

Minibatches of similar lengths: :meth:`ParallelText.epoch_order` gives the engine an epoch's permutation whose
consecutive ``batch_size`` chunks hold sentences of similar length (less padding), shuffled by the engine's
generator.

The synthetic task (:func:`synthetic_pairs`): a source sentence of distinct tokens ``s<k>`` drawn without
replacement, and its target: each token transliterated (``s<k>`` -> ``t<k>``) and the order reversed, so target
token ``j`` of a sentence of length ``n`` aligns to source token ``n - 1 - j``: gold alignments known by
construction.

References:
    Elliott, Frank, Sima'an & Specia (2016), Multi30K: Multilingual English-German Image Descriptions.
    Deng, Kim, Chiu, Guo & Rush (2018), Latent Alignment and Variational Attention.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ppl_models.data.files import fetch
from ppl_models.data.hansards import hansards_text
from ppl_models.data.text import TextDataError, Vocab, check_length, epoch_order, pad_batch, read_parallel

__all__ = [
    "ParallelText",
    "encode_pairs",
    "parallel_splits",
    "multi30k_splits",
    "synthetic_pairs",
    "synthetic_splits",
    "MULTI30K_LANGS",
    "MULTI30K_SPLITS",
]

MULTI30K_LANGS = ("en", "de", "fr")
#: split -> file prefix of the lowercased, normalized, tokenized Multi30k task-1 files
MULTI30K_SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
_ON_LONG = ("error", "skip")


class ParallelText:
    """Encoded sentence pairs (see the module docstring for the batch layout).

    :param src: source index sequences (no specials).
    :param tgt: target index sequences (``<eos>`` appended here).
    :param src_vocab: the source vocabulary.
    :param tgt_vocab: the target vocabulary.
    :param alignments: optional gold alignments, one list of ``(i, j)`` source-target pairs per sentence.
    :param lines: the 1-based line number of each pair in its files (for messages and alignment output).
    :param lower: the text was lowercased before encoding (text encoded later with these vocabularies, e.g. by
        ``ppl-models align``, must be too).
    """

    def __init__(self, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], src_vocab: Vocab, tgt_vocab: Vocab,
                 alignments: Optional[List[List[Tuple[int, int]]]] = None, lines: Optional[List[int]] = None,
                 lower: bool = False):
        if len(src) != len(tgt):
            raise TextDataError(f"parallel text: expected as many source as target sentences, received {len(src)} "
                                f"and {len(tgt)}")
        if len(src) == 0:
            raise TextDataError("parallel text: expected at least one sentence pair, received none")
        self.src = [list(s) for s in src]
        self.tgt = [list(t) + [tgt_vocab.eos_index] for t in tgt]
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.alignments = alignments
        self.lines = lines if lines is not None else list(range(1, len(src) + 1))
        self.lower = lower
        self.num_data = len(self.src)
        self._lengths = torch.tensor([max(len(s), len(t)) for s, t in zip(self.src, self.tgt)])

    def head(self, n: int) -> "ParallelText":
        """The first ``n`` pairs (same vocabularies)."""
        new = object.__new__(ParallelText)
        new.__dict__.update(self.__dict__)
        new.src, new.tgt, new.lines = self.src[:n], self.tgt[:n], self.lines[:n]
        new.alignments = None if self.alignments is None else self.alignments[:n]
        new.num_data, new._lengths = len(new.src), self._lengths[:n]
        return new

    @property
    def model_kwargs(self) -> dict:
        """The model hyperparameters the data fix: the vocabulary sizes."""
        return {"src_vocab_size": len(self.src_vocab), "tgt_vocab_size": len(self.tgt_vocab)}

    @property
    def num_target_tokens(self) -> int:
        """Target tokens including one ``<eos>`` per sentence (the perplexity's denominator)."""
        return sum(len(t) for t in self.tgt)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None):
        """``(src, src_lengths, tgt, tgt_lengths)`` for the rows ``idx`` (shape ``(batch,)``)."""
        rows = [int(i) for i in idx]
        src, src_lengths = pad_batch([self.src[i] for i in rows], self.src_vocab.pad_index)
        tgt, tgt_lengths = pad_batch([self.tgt[i] for i in rows], self.tgt_vocab.pad_index)
        return src, src_lengths, tgt, tgt_lengths

    def epoch_order(self, batch_size: int, generator: torch.Generator, pool: int = 50) -> torch.Tensor:
        """The engine's hook: a permutation of ``range(num_data)`` whose consecutive ``batch_size`` chunks have
        similar target lengths (:func:`ppl_models.data.text.epoch_order`)."""
        return epoch_order(self._lengths, batch_size, generator, pool)


def encode_pairs(src_tokens, tgt_tokens, src_vocab: Vocab, tgt_vocab: Vocab, *, max_len: int, on_long: str = "error",
                 unk: str = "map", where: Tuple[str, str] = ("source", "target"), alignments=None,
                 lower: bool = False) -> ParallelText:
    """Encode tokenized pairs with the vocabularies; sentences longer than ``max_len`` raise or are skipped."""
    if on_long not in _ON_LONG:
        raise ValueError(f"on_long: expected one of {_ON_LONG}, received {on_long!r}")
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len: expected a positive integer, received {max_len!r}")
    src, tgt, lines, kept_align, skipped = [], [], [], [], 0
    for n, (s, t) in enumerate(zip(src_tokens, tgt_tokens)):
        if len(s) > max_len or len(t) > max_len:
            if on_long == "skip":
                skipped += 1
                continue
            check_length(s, max_len, f"{where[0]}, line {n + 1}")
            check_length(t, max_len, f"{where[1]}, line {n + 1}")
        src.append(src_vocab.encode(s, unk=unk, where=f"{where[0]}, line {n + 1}"))
        tgt.append(tgt_vocab.encode(t, unk=unk, where=f"{where[1]}, line {n + 1}"))
        lines.append(n + 1)
        if alignments is not None:
            kept_align.append(alignments[n])
    if skipped:
        print(f"note: skipped {skipped} of {len(src_tokens)} sentence pairs of {where[0]} longer than {max_len} tokens",
              file=sys.stderr)
    return ParallelText(src, tgt, src_vocab, tgt_vocab, kept_align if alignments is not None else None, lines, lower)


def _build_vocabs(src_tokens, tgt_tokens, vocab_size, min_freq) -> Tuple[Vocab, Vocab]:
    return Vocab.build(src_tokens, vocab_size, min_freq), Vocab.build(tgt_tokens, vocab_size, min_freq)


def parallel_splits(source: str = "", target: str = "", valid_source: str = "", valid_target: str = "",
                    test_source: str = "", test_target: str = "", vocab_size: int = 10000, min_freq: int = 1,
                    max_len: int = 50, max_eval_len: int = 200, on_long: str = "error", unk: str = "map",
                    lower: bool = False) -> Dict[str, Optional[ParallelText]]:
    """Train/valid/test splits from any tokenized parallel text, one sentence per line (``.gz`` or plain UTF-8).

    The vocabularies are built from the training pair; validation and test files are optional (``""``).
    ``on_long`` applies to the training pair; longer validation/test sentences than ``max_eval_len`` raise.
    """
    if not source or not target:
        raise TextDataError("parallel text: [data] source and target (training files) are required")
    src_tok, tgt_tok = read_parallel(source, target, lower=lower)
    src_vocab, tgt_vocab = _build_vocabs(src_tok, tgt_tok, vocab_size, min_freq)
    out: Dict[str, Optional[ParallelText]] = {
        "train": encode_pairs(src_tok, tgt_tok, src_vocab, tgt_vocab, max_len=max_len, on_long=on_long,
                              where=(os.fspath(source), os.fspath(target)), lower=lower)
    }
    for split, (s_path, t_path) in (("valid", (valid_source, valid_target)), ("test", (test_source, test_target))):
        if bool(s_path) != bool(t_path):
            raise TextDataError(f"parallel text: {split} needs both a source and a target file, received "
                                f"{s_path!r} and {t_path!r}")
        if not s_path:
            out[split] = None
            continue
        s_tok, t_tok = read_parallel(s_path, t_path, lower=lower)
        out[split] = encode_pairs(s_tok, t_tok, src_vocab, tgt_vocab, max_len=max_eval_len, unk=unk,
                                  where=(os.fspath(s_path), os.fspath(t_path)), lower=lower)
    return out


def multi30k_splits(source_lang: str = "en", target_lang: str = "fr", vocab_size: int = 10000, min_freq: int = 2,
                    max_len: int = 30, max_eval_len: int = 100, data_dir: str = "", download: bool = True,
                    lower: bool = True, extra_train: Sequence[str] = ()) -> Dict[str, ParallelText]:
    """Multi30k task 1 (lowercased, normalized, tokenized): train 29,000 / valid 1,014 / test 2016-flickr 1,000 pairs.

    Training pairs longer than ``max_len`` are skipped (reported); validation and test are kept whole (up to
    ``max_eval_len``, else an error), so test perplexity is over the full test set.  Unknown tokens become ``<unk>``.

    :param lower: lowercase every token: the ``lc`` files already are; this lowercases ``extra_train`` text and
        marks the data (:attr:`ParallelText.lower`) so that text aligned with the run is lowercased too.
    :param extra_train: more training text appended to Multi30k's (the vocabularies are built from all of it),
        by name: ``"hansards:test"`` and ``"hansards:trial"``, the English-French Hansards text of the HLT-NAACL
        2003 alignment task (:mod:`ppl_models.data.hansards`; for ``en``/``fr`` only), as unsupervised aligners
        train on the text they align.
    """
    for lang in (source_lang, target_lang):
        if lang not in MULTI30K_LANGS:
            raise TextDataError(f"multi30k: expected a language in {MULTI30K_LANGS}, received {lang!r}")
    if source_lang == target_lang:
        raise TextDataError(f"multi30k: source and target languages are both {source_lang!r}")
    paths = {
        split: tuple(fetch("multi30k", f"{prefix}.lc.norm.tok.{lang}", data_dir=data_dir or None, download=download)
                     for lang in (source_lang, target_lang))
        for split, prefix in MULTI30K_SPLITS.items()
    }
    s_tok, t_tok = read_parallel(*paths["train"], lower=lower)
    where = " + ".join([os.fspath(paths["train"][0]), *extra_train]), os.fspath(paths["train"][1])
    for name in extra_train:
        more_src, more_tgt = _extra_text(name, source_lang, target_lang, lower, data_dir, download)
        s_tok, t_tok = s_tok + more_src, t_tok + more_tgt
    src_vocab, tgt_vocab = _build_vocabs(s_tok, t_tok, vocab_size, min_freq)
    out = {"train": encode_pairs(s_tok, t_tok, src_vocab, tgt_vocab, max_len=max_len, on_long="skip",
                                 where=where, lower=lower)}
    for split in ("valid", "test"):
        s_tok, t_tok = read_parallel(*paths[split], lower=lower)
        out[split] = encode_pairs(s_tok, t_tok, src_vocab, tgt_vocab, max_len=max_eval_len,
                                  where=tuple(os.fspath(p) for p in paths[split]), lower=lower)
    return out


#: ``extra_train`` names of :func:`multi30k_splits`: corpus -> its splits
EXTRA_TRAIN = {"hansards": ("test", "trial")}


def _extra_text(name: str, source_lang: str, target_lang: str, lower: bool, data_dir: str, download: bool):
    """``(source sentences, target sentences)`` of an ``extra_train`` entry ``"corpus:split"``."""
    corpus, _, split = name.partition(":")
    if corpus not in EXTRA_TRAIN or split not in EXTRA_TRAIN[corpus]:
        valid = ", ".join(f"{c}:{s}" for c, splits in EXTRA_TRAIN.items() for s in splits)
        raise TextDataError(f"multi30k: extra_train: unknown text {name!r}; valid: {valid}")
    if {source_lang, target_lang} != {"en", "fr"}:
        raise TextDataError(f"multi30k: extra_train {name!r} is English-French text, the languages are "
                            f"{source_lang!r} and {target_lang!r}")
    english, french = hansards_text(split, lower=lower, data_dir=data_dir or None, download=download)
    return (english, french) if source_lang == "en" else (french, english)


def synthetic_pairs(num_data: int, vocab_size: int = 20, min_len: int = 3, max_len: int = 8,
                    generator: torch.Generator | None = None):
    """``(src_tokens, tgt_tokens, alignments)``: the reverse-and-transliterate task of the module docstring.

    Each source sentence has ``min_len..max_len`` distinct tokens ``s0..s<vocab_size-1>``; target token ``j`` is the
    transliteration of source token ``n - 1 - j``; gold alignment pairs ``(n - 1 - j, j)``.
    """
    if not 1 <= min_len <= max_len <= vocab_size:
        raise ValueError(f"synthetic task: expected 1 <= min_len <= max_len <= vocab_size, received "
                         f"{min_len}, {max_len}, {vocab_size}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    src, tgt, align = [], [], []
    lengths = torch.randint(min_len, max_len + 1, (num_data,), generator=gen)
    for n in lengths.tolist():
        ids = torch.randperm(vocab_size, generator=gen)[:n].tolist()
        src.append([f"s{k}" for k in ids])
        tgt.append([f"t{k}" for k in reversed(ids)])
        align.append([(n - 1 - j, j) for j in range(n)])
    return src, tgt, align


def synthetic_splits(num_train: int = 2000, num_valid: int = 200, num_test: int = 200, vocab_size: int = 20,
                     min_len: int = 3, max_len: int = 8, seed: int = 0) -> Dict[str, ParallelText]:
    """Train/valid/test splits of the synthetic task, each with its gold alignments (``.alignments``)."""
    gen = torch.Generator().manual_seed(seed)
    raw = {split: synthetic_pairs(n, vocab_size, min_len, max_len, gen)
           for split, n in (("train", num_train), ("valid", num_valid), ("test", num_test))}
    src_vocab = Vocab([f"s{k}" for k in range(vocab_size)])
    tgt_vocab = Vocab([f"t{k}" for k in range(vocab_size)])
    return {split: encode_pairs(s, t, src_vocab, tgt_vocab, max_len=max_len, alignments=a,
                                where=(f"synthetic {split}",) * 2)
            for split, (s, t, a) in raw.items()}
