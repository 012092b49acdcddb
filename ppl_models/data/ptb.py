r"""Penn Treebank in Mikolov et al.'s (2010) language-modeling split, as sentences of word indices.

The three files ``ptb.{train,valid,test}.txt`` (one sentence per line, 10k word types including ``<unk>``,
numbers as ``N``) are found and verified by :func:`ppl_models.data.files.fetch`.  Each sentence becomes the index
sequence of its words followed by ``<eos>`` (so a sentence of :math:`n` words has length :math:`n + 1` and the
models predict :math:`n + 1` tokens); perplexity counts the ``<eos>`` tokens, as is standard.

Vocabulary (:class:`ppl_models.data.text.Vocab`, built from the training split): ``<pad>`` = 0, ``<unk>``,
``<bos>``, ``<eos>``, then the training words by frequency.  PTB's own ``<unk>`` token is the vocabulary's
``<unk>``, so the words the models predict are exactly Mikolov's 10,000 types (9,999 words incl. ``<unk>``, plus
``<eos>``); ``<pad>`` and ``<bos>`` are never predicted.

Bad input, handled once in :func:`load_ptb`:

* a token of the validation or test split that is not in the training vocabulary is mapped to ``<unk>``
  (documented handling; Mikolov's files contain none);
* an empty line is one :class:`~ppl_models.data.text.TextDataError` naming the file and line;
* a sentence longer than ``max_len`` words (default 100; PTB's longest has 82) is one
  :class:`~ppl_models.data.text.TextDataError` naming the file, the line and both lengths.

Data sets (:class:`SentenceDataset`) follow the engine's protocol: ``batch(idx, generator)`` returns
``(tokens, lengths)`` — ``tokens`` of shape ``(batch, max_len_in_batch)`` padded with ``<pad>`` = 0 and
``lengths`` of shape ``(batch,)``; the mask of real tokens is ``arange(T) < lengths[:, None]``.
:meth:`SentenceDataset.epoch_order` gives the training engine minibatches of similar lengths (little padding).

Reference: Mikolov, Karafiát, Burget, Černocký & Khudanpur (2010), Recurrent neural network based language model.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence

import torch

from ppl_models.data.files import fetch
from ppl_models.data.text import (
    TextDataError,
    Vocab,
    check_length,
    epoch_order,
    length_batches,
    pad_batch,
    read_sentences,
)

__all__ = ["PTB_SPLITS", "PTB_VOCAB_SIZE", "SentenceDataset", "encode_sentences", "load_ptb", "ptb_splits"]

PTB_SPLITS = ("train", "valid", "test")
#: Word types of Mikolov's PTB (incl. ``<unk>``); the models predict these plus ``<eos>``.
PTB_VOCAB_SIZE = 10000


class SentenceDataset:
    """Sentences as index sequences (each ending in ``<eos>``), batched with padding.

    :param sequences: index sequences, each of length >= 1.
    :param vocab: their vocabulary.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], vocab: Vocab):
        if len(sequences) == 0:
            raise TextDataError("SentenceDataset: expected at least one sentence, received none")
        self.sequences: List[List[int]] = [list(s) for s in sequences]
        self.vocab = vocab
        self.lengths = torch.tensor([len(s) for s in self.sequences], dtype=torch.long)
        self.num_data = len(self.sequences)

    @property
    def num_tokens(self) -> int:
        """Predicted tokens in the data set (words and ``<eos>``): the denominator of perplexity."""
        return int(self.lengths.sum())

    def batch(self, idx: torch.Tensor, generator: Optional[torch.Generator] = None):
        """``(tokens, lengths)`` for rows ``idx`` (shape ``(batch,)``): ``(batch, T)`` int64 padded with 0 and
        ``(batch,)`` int64, ``T`` the longest of the batch.  No randomness."""
        rows = [self.sequences[int(i)] for i in idx]
        return pad_batch(rows, self.vocab.pad_index)

    def length_batches(self, batch_size: int, generator: torch.Generator) -> List[torch.Tensor]:
        """Index minibatches of similar lengths, in a random order drawn from ``generator``."""
        return length_batches(self.lengths.tolist(), batch_size, generator)

    def epoch_order(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """The engine's hook: a permutation of ``range(num_data)`` whose consecutive ``batch_size`` chunks are
        :meth:`length_batches` (:func:`ppl_models.data.text.epoch_order`)."""
        return epoch_order(self.lengths, batch_size, generator)

    def sorted_by_length(self) -> "SentenceDataset":
        """The same sentences, shortest first (consecutive rows pad little: for evaluation)."""
        order = torch.argsort(self.lengths, stable=True)
        return SentenceDataset([self.sequences[int(i)] for i in order], self.vocab)

    def head(self, n: int) -> "SentenceDataset":
        """The first ``n`` sentences."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"head: expected a positive integer, received {n!r}")
        return SentenceDataset(self.sequences[:n], self.vocab)

    def __len__(self) -> int:
        return self.num_data


def encode_sentences(sentences: Sequence[Sequence[str]], vocab: Vocab, *, max_len: int, where: str = "text"
                     ) -> List[List[int]]:
    """Index sequences ``words + [<eos>]``; unknown words -> ``<unk>``; a sentence over ``max_len`` words raises
    one :class:`TextDataError` naming ``where`` and the line (1-based)."""
    out = []
    for lineno, words in enumerate(sentences, 1):
        check_length(words, max_len, f"{where}, line {lineno}")
        out.append(vocab.encode(words) + [vocab.eos_index])
    return out


@functools.lru_cache(maxsize=2)
def load_ptb(data_dir: Optional[str] = None, *, max_len: int = 100) -> Dict[str, object]:
    """The three splits as token lists and the training vocabulary (cached per process: do not modify them).

    :param data_dir: where to look first for ``ptb/ptb.*.txt[.gz]`` (see :func:`ppl_models.data.files.fetch`).
    :param max_len: longest sentence allowed, in words (without ``<eos>``).
    :return: ``{"train": [[word, ...], ...], "valid": ..., "test": ..., "vocab": Vocab}``.
    """
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise TextDataError(f"max_len: expected a positive integer, received {max_len!r}")
    out: Dict[str, object] = {}
    for split in PTB_SPLITS:
        path = fetch("ptb", f"ptb.{split}.txt", data_dir=data_dir)
        sentences = read_sentences(path)  # an empty line raises, naming the file and line
        for lineno, words in enumerate(sentences, 1):
            check_length(words, max_len, f"{path}, line {lineno}")
        out[split] = sentences
    out["vocab"] = Vocab.build(out["train"], max_size=PTB_VOCAB_SIZE)
    return out


def ptb_splits(data_dir: Optional[str] = None, max_len: int = 100, sort_eval: bool = True
               ) -> Dict[str, SentenceDataset]:
    """Train/valid/test :class:`SentenceDataset` s of PTB (each holds the training ``vocab``).

    :param data_dir: where to look first for the files.
    :param max_len: longest sentence allowed, in words; a longer one raises naming the file and line.
    :param sort_eval: order the validation and test sentences by length (evaluation pads little); the
        per-sentence results then follow that order.
    """
    raw = load_ptb(data_dir, max_len=max_len)
    vocab = raw["vocab"]
    splits = {}
    for split in PTB_SPLITS:
        data = SentenceDataset(encode_sentences(raw[split], vocab, max_len=max_len, where=f"ptb.{split}.txt"), vocab)
        splits[split] = data.sorted_by_length() if (sort_eval and split != "train") else data
    return splits
