"""The alignment scorer (AER, precision, recall with sure/possible gold), symmetrization and Pharaoh files."""

from __future__ import annotations

import random

import pytest

from ppl_models.tasks import aer


def test_parse_gold_positions_labels_and_sure_in_possible():
    lines = ["1 1 1 S", "1 2 3 P", "1 3 2", "2 1 2 P", "2 0 1 S", "", "2 2 2 S 0.9"]
    gold = aer.parse_gold(lines)
    assert len(gold) == 2
    assert gold[0].sure == {(0, 0), (2, 1)}  # a missing label is S; 1-based -> 0-based
    assert gold[0].possible == {(0, 0), (1, 2), (2, 1)}  # S is included in P
    assert gold[1].sure == {(1, 1)} and gold[1].possible == {(0, 1), (1, 1)}  # the NULL link (0, 1) is skipped
    assert len(aer.parse_gold(["1 1 1 S"], num_sentences=3)) == 3


@pytest.mark.parametrize("line, match", [
    ("1 1", "expected 'sentence i j"),
    ("1 a 1 S", "integer"),
    ("1 1 1 X", "label S or P"),
    ("0 1 1 S", "sentence id >= 1"),
])
def test_parse_gold_names_the_bad_line(line, match):
    with pytest.raises(ValueError, match=f"gold.txt, line 2: .*{match}"):
        aer.parse_gold(["1 1 1 S", line], where="gold.txt")


def test_scores_by_hand():
    gold = aer.parse_gold([
        "1 1 1 S", "1 2 2 P", "1 2 3 P",  # S = {(0,0)}, P = {(0,0), (1,1), (1,2)}
        "2 1 1 S", "2 2 2 S",  # S = P = {(0,0), (1,1)}
    ])
    predicted = [
        {(0, 0), (1, 1), (2, 2)},  # a sure hit, a possible hit, a miss
        {(0, 0), (0, 1)},  # a sure hit, a miss
    ]
    s = aer.score(predicted, gold)
    # |A| = 5, |S| = 3, |A ∩ S| = 2, |A ∩ P| = 3
    assert (s.num_predicted, s.num_sure, s.num_possible, s.sure_hits, s.possible_hits) == (5, 3, 5, 2, 3)
    assert s.precision == pytest.approx(3 / 5)
    assert s.recall == pytest.approx(2 / 3)
    assert s.aer == pytest.approx(1 - (2 + 3) / (5 + 3))


def test_perfect_sure_links_score_zero_and_possible_only_links_do_not_hurt():
    gold = aer.parse_gold(["1 1 1 S", "1 2 2 S", "1 3 3 P"])
    assert aer.score([{(0, 0), (1, 1)}], gold).aer == 0.0
    assert aer.score([{(0, 0), (1, 1), (2, 2)}], gold).aer == 0.0  # (|A∩S| + |A∩P|) / (|A| + |S|) = 5/5
    assert aer.score([set()], gold).aer == 1.0
    with pytest.raises(ValueError, match="one predicted link set per gold sentence"):
        aer.score([set(), set()], gold)


def test_grow_diag_final_by_hand():
    """Koehn et al.'s order matters: (2,0) joins from the diagonal of (1,1) before (2,2) is reached, so (2,2)'s row
    and column are both aligned by then and it never joins; FINAL adds the isolated (4,0) and (3,4)."""
    a = {(0, 0), (1, 1), (2, 2), (2, 0), (4, 0)}
    b = {(0, 0), (1, 1), (1, 2), (3, 4)}
    assert aer.grow_diag_final(a, b) == {(0, 0), (1, 1), (1, 2), (2, 0), (4, 0), (3, 4)}
    # a union point whose row and column are both aligned never joins, neighbour or not; one whose column is
    # free joins in FINAL even far from the others
    assert aer.grow_diag_final({(0, 0), (1, 1), (0, 1)}, {(0, 0), (1, 1), (1, 0)}) == {(0, 0), (1, 1)}
    assert aer.grow_diag_final({(0, 0), (1, 1), (0, 3)}, {(0, 0), (1, 1)}) == {(0, 0), (1, 1), (0, 3)}
    assert aer.grow_diag_final(set(), set()) == set()


def test_symmetrizations_sit_between_intersection_and_union():
    rng = random.Random(0)
    for _ in range(200):
        li, lj = rng.randint(1, 8), rng.randint(1, 8)
        fwd = {(rng.randrange(li), j) for j in range(lj) if rng.random() < 0.8}  # one link per j
        bwd = {(i, rng.randrange(lj)) for i in range(li) if rng.random() < 0.8}  # one link per i
        (inter,), (uni,), (gdf,) = (aer.symmetrize([fwd], [bwd], m, [(li, lj)]) for m in aer.SYMMETRIZATIONS)
        assert inter <= fwd <= uni and inter <= bwd <= uni
        assert inter <= gdf <= uni
        assert inter == fwd & bwd and uni == fwd | bwd
        # every point left out by grow-diag-final has both its row and its column aligned
        rows, cols = {i for i, _ in gdf}, {j for _, j in gdf}
        assert all(i in rows and j in cols for i, j in uni - gdf)
    with pytest.raises(ValueError, match="grow-diag-final"):
        aer.symmetrize([set()], [set()], "grow")


def test_transpose_and_pharaoh_round_trip(tmp_path):
    links = [{(0, 1), (2, 0)}, set(), {(10, 3)}]
    assert aer.pharaoh_line(links[0]) == "0-1 2-0"
    assert aer.transpose(links[0]) == {(1, 0), (0, 2)}
    path = tmp_path / "out.align"
    aer.write_pharaoh(path, links)
    assert path.read_text() == "0-1 2-0\n\n10-3\n"
    assert aer.read_pharaoh(path) == links
    with pytest.raises(ValueError, match="line 1: expected 0-based 'i-j' pairs, received '1:2'"):
        (tmp_path / "bad").write_text("1:2\n")
        aer.read_pharaoh(tmp_path / "bad")


def test_hansards_trial_gold(shared_data):
    from ppl_models.data.hansards import hansards_gold_path, hansards_text

    en, fr = hansards_text("trial", data_dir=shared_data)
    gold = aer.read_gold(hansards_gold_path(data_dir=shared_data), num_sentences=len(en))
    assert len(gold) == 37
    assert sum(len(g.sure) for g in gold) == 338
    assert sum(len(g.possible) for g in gold) == 1784  # every link is possible, the sure ones too
    # English position first: every link lies inside its sentences
    assert all(i < len(e) and j < len(f) for g, e, f in zip(gold, en, fr) for i, j in g.possible)


class _FixedAligner:
    """An aligner of the :func:`ppl_models.tasks.alignment.align_text` interface with given links per pair; it
    records the (normalized) text it was given."""

    def __init__(self, links, lower, vocab_words):
        from ppl_models.data.text import Vocab

        self.fixed, self.lower, self.name, self.seen = links, lower, "fixed", None
        self.src_vocab = self.tgt_vocab = Vocab(sorted(vocab_words))

    def links(self, src, tgt, method, threshold, bar):
        self.seen = (src, tgt)
        if bar is not None:
            bar.update(len(src))
        return [set(x) for x in self.fixed]


def test_align_text_transposes_the_reverse_direction_and_symmetrizes():
    from ppl_models.tasks.alignment import align_text

    src, tgt = [["A", "b"], ["c"]], [["x", "Y", "z"], ["w"]]
    forward = _FixedAligner([{(0, 0), (1, 1), (1, 2)}, {(0, 0)}], lower=True, vocab_words={"a", "b", "x"})
    # the reverse aligner links (target j, source i): (0, 0) and (2, 1) are (0, 0) and (1, 2) forward
    reverse = _FixedAligner([{(0, 0), (2, 1)}, set()], lower=False, vocab_words={"A"})
    out = align_text(forward, src, tgt, reverse=reverse, symmetrize="intersection", progress=False)
    assert forward.seen == ([["a", "b"], ["c"]], [["x", "y", "z"], ["w"]])  # each aligner's own normalization
    assert reverse.seen == (tgt, src)
    assert out.reverse == [{(0, 0), (1, 2)}, set()]
    assert out.links == [{(0, 0), (1, 2)}, set()]
    assert out.unknown["forward: fixed"] == {"src_unknown": 1, "src_tokens": 3, "tgt_unknown": 3, "tgt_tokens": 4}
    gold = [aer.GoldLinks(frozenset({(0, 0)}), frozenset({(0, 0), (1, 2)})), aer.GoldLinks(frozenset(), frozenset())]
    scores = out.scores(gold, "intersection")
    assert scores["intersection"].aer == 0.0 and scores["forward"].precision == 2 / 4
    grown = align_text(forward, src, tgt, reverse=reverse, symmetrize="grow-diag-final", progress=False)
    assert grown.links[0] >= out.links[0] and grown.links[0] <= forward.fixed[0] | out.reverse[0]
    with pytest.raises(ValueError, match="as many source as target sentences"):
        align_text(forward, src, tgt[:1], progress=False)
