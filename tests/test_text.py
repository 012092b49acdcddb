"""Tokenized text utilities: vocabulary, reading files, padding, length batches."""

import gzip

import pytest
import torch

from ppl_models.data.text import (
    TextDataError,
    Vocab,
    check_length,
    epoch_order,
    length_batches,
    pad_batch,
    read_parallel,
    read_sentences,
)
from ppl_models.encodings import BOS, EOS, PAD, UNK


def test_vocab_build_orders_by_frequency_and_maps_unknown():
    vocab = Vocab.build([["a", "b", "b"], ["c", "b", "a"]], max_size=2)
    assert vocab.itos[:4] == [PAD, UNK, BOS, EOS]
    assert vocab.itos[4:] == ["b", "a"]
    assert vocab.pad_index == 0
    assert vocab.encode(["a", "zzz"]) == [vocab.stoi["a"], vocab.unk_index]
    with pytest.raises(TextDataError, match=r"line 3, token 1: 'zzz' is not in the vocabulary"):
        vocab.encode(["a", "zzz"], unk="error", where="line 3")
    assert vocab.decode([vocab.bos_index, vocab.stoi["b"], vocab.eos_index, vocab.stoi["a"]]) == ["b"]
    assert Vocab.from_dict(vocab.to_dict()) == vocab


def test_vocab_keeps_unk_token_present_in_data():
    vocab = Vocab.build([["<unk>", "x", "<unk>"]])
    assert vocab.itos == [PAD, UNK, BOS, EOS, "x"]


def test_read_sentences_gz_and_empty_lines(tmp_path):
    path = tmp_path / "a.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("the cat\n\nsat down\n")
    with pytest.raises(TextDataError, match=r"a.txt.gz, line 2: expected at least one token, received an empty line"):
        read_sentences(path)
    assert read_sentences(path, skip_empty=True) == [["the", "cat"], ["sat", "down"]]
    with pytest.raises(TextDataError, match="does not exist"):
        read_sentences(tmp_path / "missing.txt")


def test_read_parallel_errors(tmp_path):
    src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
    src.write_text("a b\nc\n")
    tgt.write_text("x\n")
    with pytest.raises(TextDataError, match=r"expected the same number of lines, received 2 in .*s.txt and 1 in .*t.txt"):
        read_parallel(src, tgt)
    tgt.write_text("x\n \n")
    with pytest.raises(TextDataError, match=r"t.txt, line 2: expected at least one token"):
        read_parallel(src, tgt)
    tgt.write_text("X y\nz\n")
    assert read_parallel(src, tgt, lower=True) == ([["a", "b"], ["c"]], [["x", "y"], ["z"]])


def test_pad_batch_and_check_length():
    tokens, lengths = pad_batch([[5, 6, 7], [8]], pad_index=0)
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert lengths.tolist() == [3, 1]
    with pytest.raises(TextDataError, match="sequence 1: expected at least one token"):
        pad_batch([[1], []])
    with pytest.raises(TextDataError, match="line 4: expected at most 2 tokens, received 3"):
        check_length([1, 2, 3], 2, "line 4")


def test_length_batches_cover_every_index_once_and_group_lengths():
    lengths = torch.randint(1, 50, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    batches = length_batches(lengths, 32, torch.Generator().manual_seed(1), pool=10)
    allidx = torch.cat(batches)
    assert sorted(allidx.tolist()) == list(range(1000))
    spread = sum(int(torch.tensor(lengths)[b].max() - torch.tensor(lengths)[b].min()) for b in batches) / len(batches)
    assert spread < 10  # random batches of 32 from 1..49 would spread ~45
    again = length_batches(lengths, 32, torch.Generator().manual_seed(1), pool=10)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_epoch_order_chunks_are_the_length_batches_with_the_short_batch_last():
    lengths = torch.randint(1, 30, (203,), generator=torch.Generator().manual_seed(2))
    batches = length_batches(lengths, 16, torch.Generator().manual_seed(3), pool=4)
    assert all(len(b) == 16 for b in batches[:-1]) and len(batches[-1]) == 203 % 16
    order = epoch_order(lengths, 16, torch.Generator().manual_seed(3), pool=4)
    assert [c.tolist() for c in order.split(16)] == [b.tolist() for b in batches]
