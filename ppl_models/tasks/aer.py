r"""Word-alignment quality: sure/possible gold links, AER/precision/recall, symmetrization, Pharaoh files.

**Links.**  A sentence's alignment is a set of ``(i, j)`` pairs of 0-based positions, ``i`` in the first sentence
and ``j`` in the second (a Pharaoh ``i-j`` pair; an aligner's output is ``(source, target)``).  Compare links with
gold in the gold file's orientation: for the Hansards gold (English first) an English→French aligner's links are
already ``(english, french)``; a French→English aligner's links are :func:`transpose`\ d first.

**Gold** (:func:`read_gold`), the HLT-NAACL 2003 shared-task format (Mihalcea & Pedersen 2003): one link per line,
``sentence i j [S|P]`` (optionally a fifth field, a confidence, ignored), sentence ids and positions 1-based, a
missing label meaning ``S`` (sure).  Position 0 (a NULL link, absent from ``*.nonullalign`` files) is skipped.  The
possible links include the sure ones: :math:`S \subseteq P`.

**Scores** (Och & Ney 2003), summed over the corpus, for predicted links :math:`A`:

.. math::
    \mathrm{precision} = \frac{|A \cap P|}{|A|}, \quad \mathrm{recall} = \frac{|A \cap S|}{|S|}, \quad
    \mathrm{AER} = 1 - \frac{|A \cap S| + |A \cap P|}{|A| + |S|}.

**Symmetrization** of two directions given in one orientation (:func:`symmetrize`): ``intersection``, ``union``
and ``grow-diag-final`` (Koehn, Och & Marcu 2003; :func:`grow_diag_final`).

References:
    Och & Ney (2003), A Systematic Comparison of Various Statistical Alignment Models. Computational Linguistics.
    Koehn, Och & Marcu (2003), Statistical Phrase-Based Translation. HLT-NAACL (grow-diag-final).
    Mihalcea & Pedersen (2003), An Evaluation Exercise for Word Alignment.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

__all__ = [
    "Link",
    "GoldLinks",
    "AERScores",
    "SYMMETRIZATIONS",
    "read_gold",
    "parse_gold",
    "score",
    "transpose",
    "intersection",
    "union",
    "grow_diag_final",
    "symmetrize",
    "pharaoh_line",
    "parse_pharaoh_line",
    "read_pharaoh",
    "write_pharaoh",
]

Link = Tuple[int, int]
SYMMETRIZATIONS = ("intersection", "union", "grow-diag-final")
#: Koehn's neighbourhood: the four adjacent and the four diagonal points.
_NEIGHBOURS = ((-1, 0), (0, -1), (1, 0), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


@dataclass(frozen=True)
class GoldLinks:
    """One sentence's gold: ``sure`` :math:`S` and ``possible`` :math:`P \\supseteq S`, 0-based ``(i, j)`` pairs."""

    sure: FrozenSet[Link]
    possible: FrozenSet[Link]


@dataclass(frozen=True)
class AERScores:
    """Corpus-level scores and the counts they come from."""

    aer: float
    precision: float
    recall: float
    num_predicted: int  # |A|
    num_sure: int  # |S|
    num_possible: int  # |P|
    sure_hits: int  # |A ∩ S|
    possible_hits: int  # |A ∩ P|

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------------------
# Gold
# ---------------------------------------------------------------------------------------------------------


def _open(path):
    path = os.fspath(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def parse_gold(lines: Iterable[str], num_sentences: Optional[int] = None, where: str = "gold") -> List[GoldLinks]:
    """Gold links from ``sentence i j [S|P]`` lines (see the module docstring); entry ``n`` is sentence ``n + 1``.

    :param num_sentences: the number of sentences (default: the largest sentence id); a larger id is an error.
    :param where: the file name, for messages.
    """
    sure: dict = {}
    possible: dict = {}
    largest = 0
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (3, 4, 5):
            raise ValueError(f"{where}, line {lineno}: expected 'sentence i j [S|P]', received {line.strip()!r}")
        try:
            sent, i, j = (int(x) for x in fields[:3])
        except ValueError:
            raise ValueError(f"{where}, line {lineno}: expected integer sentence id and positions, received "
                             f"{line.strip()!r}") from None
        label = fields[3] if len(fields) > 3 else "S"
        if label not in ("S", "P"):
            raise ValueError(f"{where}, line {lineno}: expected the label S or P, received {label!r}")
        if sent < 1 or i < 0 or j < 0:
            raise ValueError(f"{where}, line {lineno}: expected a sentence id >= 1 and positions >= 0, received "
                             f"{line.strip()!r}")
        if num_sentences is not None and sent > num_sentences:
            raise ValueError(f"{where}, line {lineno}: sentence {sent}, but there are {num_sentences} sentences")
        largest = max(largest, sent)
        if i == 0 or j == 0:  # a NULL link
            continue
        link = (i - 1, j - 1)
        possible.setdefault(sent, set()).add(link)
        if label == "S":
            sure.setdefault(sent, set()).add(link)
    count = num_sentences if num_sentences is not None else largest
    return [GoldLinks(frozenset(sure.get(n, ())), frozenset(possible.get(n, ()))) for n in range(1, count + 1)]


def read_gold(path: str | os.PathLike, num_sentences: Optional[int] = None) -> List[GoldLinks]:
    """:func:`parse_gold` of a file (``.gz`` or plain)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gold alignment file {os.fspath(path)} does not exist")
    with _open(path) as f:
        return parse_gold(f, num_sentences, where=os.fspath(path))


# ---------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------


def score(predicted: Sequence[Iterable[Link]], gold: Sequence[GoldLinks]) -> AERScores:
    """AER, precision and recall of ``predicted`` (one link set per sentence, in the gold's orientation).

    :raises ValueError: if the numbers of sentences differ.
    """
    if len(predicted) != len(gold):
        raise ValueError(f"score: expected one predicted link set per gold sentence ({len(gold)}), received "
                         f"{len(predicted)}")
    a_total = s_total = p_total = a_s = a_p = 0
    for links, g in zip(predicted, gold):
        links = set(links)
        a_total += len(links)
        s_total += len(g.sure)
        p_total += len(g.possible | g.sure)
        a_s += len(links & g.sure)
        a_p += len(links & (g.possible | g.sure))
    aer = 1.0 - (a_s + a_p) / (a_total + s_total) if a_total + s_total else 0.0
    precision = a_p / a_total if a_total else 0.0
    recall = a_s / s_total if s_total else 0.0
    return AERScores(aer, precision, recall, a_total, s_total, p_total, a_s, a_p)


# ---------------------------------------------------------------------------------------------------------
# Symmetrization
# ---------------------------------------------------------------------------------------------------------


def transpose(links: Iterable[Link]) -> Set[Link]:
    """``(j, i)`` for every ``(i, j)``: a backward direction's links in the forward orientation."""
    return {(j, i) for i, j in links}


def intersection(a: Iterable[Link], b: Iterable[Link]) -> Set[Link]:
    return set(a) & set(b)


def union(a: Iterable[Link], b: Iterable[Link]) -> Set[Link]:
    return set(a) | set(b)


def grow_diag_final(a: Iterable[Link], b: Iterable[Link], len_i: Optional[int] = None,
                    len_j: Optional[int] = None) -> Set[Link]:
    """GROW-DIAG-FINAL (Koehn et al. 2003) of two directions ``a``, ``b`` in one orientation:

    1. start from the intersection;
    2. GROW-DIAG: repeat until nothing is added: for every point ``(i, j)`` of the alignment, in the order
       ``i = 0..``, ``j = 0..`` (points added during a sweep are visited later in the same sweep), add each
       neighbour (adjacent or diagonal, in Koehn's order) that is in the union and whose ``i`` or ``j`` is not yet
       aligned;
    3. FINAL(a), then FINAL(b): add every point of that direction, in the same order, whose ``i`` or ``j`` is not
       yet aligned.

    :param len_i: length of the first sentence (default: one past the largest ``i`` of the union).
    :param len_j: length of the second sentence.
    """
    a, b = set(a), set(b)
    both = a | b
    alignment = a & b
    if not both:
        return alignment
    len_i = len_i if len_i is not None else 1 + max(i for i, _ in both)
    len_j = len_j if len_j is not None else 1 + max(j for _, j in both)
    aligned_i = {i for i, _ in alignment}
    aligned_j = {j for _, j in alignment}

    def add(i, j):
        alignment.add((i, j))
        aligned_i.add(i)
        aligned_j.add(j)

    added = True
    while added:
        added = False
        for i in range(len_i):
            for j in range(len_j):
                if (i, j) not in alignment:
                    continue
                for di, dj in _NEIGHBOURS:
                    p = (i + di, j + dj)
                    if p in both and p not in alignment and (p[0] not in aligned_i or p[1] not in aligned_j):
                        add(*p)
                        added = True
    for direction in (a, b):
        for i in range(len_i):
            for j in range(len_j):
                if (i, j) in direction and (i not in aligned_i or j not in aligned_j):
                    add(i, j)
    return alignment


def symmetrize(forward: Sequence[Iterable[Link]], backward: Sequence[Iterable[Link]], method: str,
               lengths: Optional[Sequence[Tuple[int, int]]] = None) -> List[Set[Link]]:
    """One symmetrized link set per sentence from two directions in one orientation (``backward`` already
    :func:`transpose`\\ d).

    :param method: one of :data:`SYMMETRIZATIONS`.
    :param lengths: ``(len_i, len_j)`` per sentence, for ``grow-diag-final`` (default: from the links).
    """
    if method not in SYMMETRIZATIONS:
        raise ValueError(f"symmetrize: method must be one of {', '.join(SYMMETRIZATIONS)}, received {method!r}")
    if len(forward) != len(backward):
        raise ValueError(f"symmetrize: expected as many sentences in both directions, received {len(forward)} and "
                         f"{len(backward)}")
    if lengths is not None and len(lengths) != len(forward):
        raise ValueError(f"symmetrize: expected {len(forward)} sentence lengths, received {len(lengths)}")
    out = []
    for n, (f, b) in enumerate(zip(forward, backward)):
        if method == "intersection":
            out.append(intersection(f, b))
        elif method == "union":
            out.append(union(f, b))
        else:
            li, lj = lengths[n] if lengths is not None else (None, None)
            out.append(grow_diag_final(f, b, li, lj))
    return out


# ---------------------------------------------------------------------------------------------------------
# Pharaoh files
# ---------------------------------------------------------------------------------------------------------


def pharaoh_line(links: Iterable[Link]) -> str:
    """``"i-j i-j ..."``, sorted (0-based)."""
    return " ".join(f"{i}-{j}" for i, j in sorted(links))


def parse_pharaoh_line(line: str, where: str = "pharaoh line") -> Set[Link]:
    links = set()
    for item in line.split():
        i, sep, j = item.partition("-")
        if not sep or not i.isdigit() or not j.isdigit():
            raise ValueError(f"{where}: expected 0-based 'i-j' pairs, received {item!r}")
        links.add((int(i), int(j)))
    return links


def read_pharaoh(path: str | os.PathLike) -> List[Set[Link]]:
    """One link set per line of a Pharaoh file (an empty line: no links)."""
    with _open(path) as f:
        return [parse_pharaoh_line(line, f"{os.fspath(path)}, line {n}") for n, line in enumerate(f, 1)]


def write_pharaoh(path: str | os.PathLike, alignments: Sequence[Iterable[Link]]) -> None:
    """Write one :func:`pharaoh_line` per sentence (atomically: a temporary file renamed into place)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for links in alignments:
                f.write(pharaoh_line(links) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
