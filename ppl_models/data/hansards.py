r"""The English–French Hansards word-alignment data of the HLT-NAACL 2003 shared task (Mihalcea & Pedersen 2003).

Files (dataset ``hansards_align``, found and checksum-verified by :func:`ppl_models.data.files.fetch`: ``data_dir``,
then ``$PPL_MODELS_DATA/hansards_align/``, then the cache; no public URL serves these exact files):

* ``dev.e`` / ``dev.f`` — the 37-pair **trial** set, English / French, one tokenized sentence per line;
* ``dev.wa.nonullalign`` — its gold links (Och & Ney's sure/possible annotation), one link per line,
  ``sentence english_position french_position [S|P]``, all 1-based, English first, a missing label meaning ``S``
  (read it with :func:`ppl_models.tasks.aer.read_gold`);
* ``test.e`` / ``test.f`` — the 447 **test** pairs' text (their links are held out): unsupervised aligners train on
  it, as the shared task does.

**Preprocessing.**  The text is tokenized as distributed (the French has contractions expanded: ``de les``).
Tokens are lowercased by default (``lower=True``), the usual preprocessing of this task's systems and the form of
Multi30k's ``lc.norm.tok`` files that aligners here train on together with it; the files themselves keep the case
of proper nouns (``House``, ``Canada``, ``M.``).  Lowercasing changes no token count or position, so gold links
still apply.

References:
    Mihalcea & Pedersen (2003), An Evaluation Exercise for Word Alignment. HLT-NAACL 2003 Workshop on Building
    and Using Parallel Texts.
    Och & Ney (2003), A Systematic Comparison of Various Statistical Alignment Models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

from ppl_models.data.files import fetch
from ppl_models.data.text import TextDataError, read_parallel

__all__ = ["HANSARDS_DATASET", "HANSARDS_SPLITS", "hansards_text", "hansards_gold_path"]

HANSARDS_DATASET = "hansards_align"
#: split -> (English file, French file)
HANSARDS_SPLITS = {"trial": ("dev.e", "dev.f"), "test": ("test.e", "test.f")}


def hansards_text(split: str = "trial", *, lower: bool = True, data_dir: Optional[str | os.PathLike] = None,
                  download: bool = False) -> Tuple[List[List[str]], List[List[str]]]:
    """``(english, french)``: the tokenized sentences of a split (``"trial"``: 37 pairs, ``"test"``: 447).

    :param lower: lowercase every token (the module docstring).
    :param data_dir: a root holding ``hansards_align/`` (searched before ``$PPL_MODELS_DATA`` and the cache).
    :param download: try a download when no local copy is found (none is known: this only changes the message).
    """
    if split not in HANSARDS_SPLITS:
        raise TextDataError(f"hansards: expected a split in {tuple(HANSARDS_SPLITS)}, received {split!r}")
    en, fr = (fetch(HANSARDS_DATASET, name, data_dir=data_dir, download=download) for name in HANSARDS_SPLITS[split])
    return read_parallel(en, fr, lower=lower)


def hansards_gold_path(*, data_dir: Optional[str | os.PathLike] = None, download: bool = False) -> Path:
    """The verified path of the trial set's gold links (``dev.wa.nonullalign``, English position first)."""
    return fetch(HANSARDS_DATASET, "dev.wa.nonullalign", data_dir=data_dir, download=download)
