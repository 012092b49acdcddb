r"""Tokenized text: vocabularies, reading one-sentence-per-line files, padded batches with lengths.

Shared by the sequence models (language models on Penn Treebank, latent-alignment models on parallel text).

* :class:`Vocab` — token <-> index maps with the special tokens ``<pad>`` (index 0), ``<unk>``, ``<bos>``,
  ``<eos>`` (:data:`ppl_models.encodings.SPECIALS`, the convention the models read); built from training
  sentences (most frequent first, ties broken by first appearance), saved as plain containers
  (:meth:`Vocab.to_dict`), so a checkpoint holding it loads with ``weights_only=True``.
* :func:`read_sentences` — whitespace-tokenized lines of a text file (``.gz`` or plain, UTF-8); an empty line is
  an error naming the file and line unless ``skip_empty``.
* :func:`read_parallel` — a source and a target file with one sentence pair per line; a line-count mismatch or an
  empty line on either side is one error naming both files and the line.
* :func:`pad_batch` — a list of index sequences as one ``(batch, max_len)`` ``LongTensor`` padded with
  ``<pad>`` plus their lengths, the form every sequence model here takes (with a mask ``arange(T) < lengths``).
* :func:`length_batches`, :func:`epoch_order` — minibatches of similar lengths (less padding), shuffled by an
  explicit generator; ``epoch_order`` is the engine's hook for ordering an epoch.

Unknown tokens: :meth:`Vocab.encode` maps them to ``<unk>`` (``unk="map"``, the default — the documented handling
at evaluation time) or raises :class:`TextDataError` naming the token and where it occurred (``unk="error"``).
Sequences longer than a model's limit: :func:`check_length` raises one error naming the line and both lengths.
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.nn.utils.rnn import pad_sequence

from ppl_models.encodings import BOS, EOS, PAD, SPECIALS, UNK

__all__ = [
    "TextDataError",
    "Vocab",
    "read_sentences",
    "read_parallel",
    "check_length",
    "pad_batch",
    "length_batches",
    "epoch_order",
]


class TextDataError(ValueError):
    """Text input that does not fit: an empty line, mismatched files, an unknown token, a sequence too long."""


class Vocab:
    """Token <-> index maps; ``<pad>`` is index 0 and the other specials follow.

    :param tokens: the tokens in index order; the specials are put first if missing.
    """

    def __init__(self, tokens: Sequence[str]):
        itos: List[str] = list(SPECIALS)
        seen = set(itos)
        for tok in tokens:
            if tok not in seen:
                seen.add(tok)
                itos.append(tok)
        self.itos = itos
        self.stoi: Dict[str, int] = {t: i for i, t in enumerate(itos)}

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], max_size: Optional[int] = None, min_freq: int = 1) -> "Vocab":
        """The vocabulary of ``sentences``: tokens seen at least ``min_freq`` times, most frequent first, at most
        ``max_size`` of them besides the specials (the rest become ``<unk>``)."""
        if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
            raise TextDataError(f"vocabulary max_size: expected a positive integer or None, received {max_size!r}")
        counts: Counter = Counter()
        for sent in sentences:
            counts.update(sent)
        for special in SPECIALS:
            counts.pop(special, None)
        # Counter.most_common keeps first-insertion order among equal counts: deterministic.
        kept = [t for t, c in counts.most_common() if c >= min_freq]
        if max_size is not None:
            kept = kept[:max_size]
        return cls(kept)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    @property
    def pad_index(self) -> int:
        return self.stoi[PAD]

    @property
    def unk_index(self) -> int:
        return self.stoi[UNK]

    @property
    def bos_index(self) -> int:
        return self.stoi[BOS]

    @property
    def eos_index(self) -> int:
        return self.stoi[EOS]

    def encode(self, tokens: Sequence[str], *, unk: str = "map", where: str = "") -> List[int]:
        """Indices of ``tokens``; unknown ones become ``<unk>`` (``unk="map"``) or raise (``unk="error"``)."""
        if unk not in ("map", "error"):
            raise ValueError(f"unk: expected 'map' or 'error', received {unk!r}")
        out = []
        for pos, tok in enumerate(tokens):
            i = self.stoi.get(tok)
            if i is None:
                if unk == "error":
                    at = f"{where}, " if where else ""
                    raise TextDataError(f"{at}token {pos}: {tok!r} is not in the vocabulary ({len(self)} types)")
                i = self.unk_index
            out.append(i)
        return out

    def decode(self, ids: Iterable[int], strip_specials: bool = True) -> List[str]:
        """Tokens of ``ids``; with ``strip_specials`` drop ``<pad>``/``<bos>`` and stop at ``<eos>``."""
        out = []
        for i in ids:
            tok = self.itos[int(i)]
            if strip_specials:
                if tok == EOS:
                    break
                if tok in (PAD, BOS):
                    continue
            out.append(tok)
        return out

    def to_dict(self) -> dict:
        """Plain containers (for checkpoints and JSON)."""
        return {"itos": list(self.itos)}

    @classmethod
    def from_dict(cls, state: dict) -> "Vocab":
        itos = state["itos"]
        if list(itos[: len(SPECIALS)]) != list(SPECIALS):
            raise TextDataError(f"vocabulary: expected the specials {SPECIALS} first, received {tuple(itos[:4])}")
        return cls(itos[len(SPECIALS) :])

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocab({len(self)} types)"


def _open_text(path: str | os.PathLike):
    path = os.fspath(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_sentences(path: str | os.PathLike, *, skip_empty: bool = False, lower: bool = False) -> List[List[str]]:
    """Whitespace-tokenized lines of ``path`` (``.gz`` or plain UTF-8).

    :param skip_empty: drop empty (or all-whitespace) lines instead of raising :class:`TextDataError`.
    :param lower: lowercase every token.
    """
    if not os.path.isfile(path):
        raise TextDataError(f"text file {os.fspath(path)} does not exist")
    out = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            tokens = (line.lower() if lower else line).split()
            if not tokens:
                if skip_empty:
                    continue
                raise TextDataError(f"{os.fspath(path)}, line {lineno}: expected at least one token, received an empty line")
            out.append(tokens)
    return out


def read_parallel(source: str | os.PathLike, target: str | os.PathLike, *, lower: bool = False
                  ) -> Tuple[List[List[str]], List[List[str]]]:
    """Sentence pairs from a source and a target file, line by line.

    Raises one :class:`TextDataError` if the files have different numbers of lines (naming both counts) or if a
    line is empty on either side (naming the file and line: an empty sentence has no alignment).
    """
    src_lines = _raw_lines(source)
    tgt_lines = _raw_lines(target)
    if len(src_lines) != len(tgt_lines):
        raise TextDataError(
            f"parallel text: expected the same number of lines, received {len(src_lines)} in {os.fspath(source)} "
            f"and {len(tgt_lines)} in {os.fspath(target)}"
        )
    src_out, tgt_out = [], []
    for lineno, (s, t) in enumerate(zip(src_lines, tgt_lines), 1):
        s_tok = (s.lower() if lower else s).split()
        t_tok = (t.lower() if lower else t).split()
        for toks, path in ((s_tok, source), (t_tok, target)):
            if not toks:
                raise TextDataError(
                    f"{os.fspath(path)}, line {lineno}: expected at least one token, received an empty line"
                )
        src_out.append(s_tok)
        tgt_out.append(t_tok)
    return src_out, tgt_out


def _raw_lines(path) -> List[str]:
    if not os.path.isfile(path):
        raise TextDataError(f"text file {os.fspath(path)} does not exist")
    with _open_text(path) as f:
        return f.read().splitlines()


def check_length(tokens: Sequence, max_len: int, where: str) -> None:
    """Raise one :class:`TextDataError` naming ``where`` if ``tokens`` is longer than ``max_len``."""
    if len(tokens) > max_len:
        raise TextDataError(f"{where}: expected at most {max_len} tokens, received {len(tokens)}")


def pad_batch(seqs: Sequence[Sequence[int]], pad_index: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, lengths)``: ``tokens`` of shape ``(batch, max_len)`` (``int64``, padded with ``pad_index``) and
    ``lengths`` of shape ``(batch,)``.  The mask of real tokens is ``arange(max_len) < lengths[:, None]``."""
    if len(seqs) == 0:
        raise TextDataError("pad_batch: expected at least one sequence, received none")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    if int(lengths.min()) < 1:
        bad = int((lengths < 1).nonzero()[0])
        raise TextDataError(f"pad_batch: sequence {bad}: expected at least one token, received none")
    rows = [torch.as_tensor(list(s), dtype=torch.long) for s in seqs]
    return pad_sequence(rows, batch_first=True, padding_value=pad_index), lengths


def length_batches(lengths: Sequence[int] | torch.Tensor, batch_size: int, generator: torch.Generator,
                   pool: int = 50) -> List[torch.Tensor]:
    """Minibatches of indices with similar lengths, in a random order; the one short batch last.

    The data are shuffled with ``generator``, cut into pools of ``pool * batch_size`` indices, each pool is sorted
    by length and cut into batches; the full batches are shuffled and the short ones follow them, so that the
    concatenation cut into consecutive ``batch_size`` chunks gives back exactly these batches
    (:func:`epoch_order`).  Padding stays small while every epoch differs.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, received {batch_size!r}")
    lengths_t = torch.as_tensor(lengths, dtype=torch.long)
    perm = torch.randperm(len(lengths_t), generator=generator)
    full, short = [], []
    span = pool * batch_size
    for start in range(0, len(perm), span):
        chunk = perm[start : start + span]
        chunk = chunk[torch.argsort(lengths_t[chunk], stable=True)]
        for b in chunk.split(batch_size):
            (full if len(b) == batch_size else short).append(b)
    order = torch.randperm(len(full), generator=generator)
    return [full[i] for i in order] + short


def epoch_order(lengths: Sequence[int] | torch.Tensor, batch_size: int, generator: torch.Generator,
                pool: int = 50) -> torch.Tensor:
    """The engine's ``epoch_order`` hook for a data set of sequences: a permutation of ``range(len(lengths))``
    whose consecutive ``batch_size`` chunks are the :func:`length_batches`."""
    return torch.cat(length_batches(lengths, batch_size, generator, pool))
