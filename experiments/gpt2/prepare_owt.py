"""Tokenize OpenWebText with the GPT-2 BPE (tiktoken) into uint16 token shards. NEEDS A NETWORK.

    pip install datasets            # not a project dependency: only this script uses it
    python -m experiments.gpt2.prepare_owt --out_dir data/openwebtext --num_proc 16

Downloads the ``openwebtext`` dataset from the Hugging Face hub (~8M documents, ~54 GB of cache)
and tiktoken's ``gpt2`` BPE files, so it is never run by the tests. Output, as nanoGPT's
``data/openwebtext/prepare.py`` but cut into shards:

* ``train_000000.bin``, ``train_000001.bin``, ... and ``val_000000.bin``: raw little-endian uint16
  token ids (GPT-2's 50257 ids fit in 16 bits), documents back to back, each followed by
  ``<|endoftext|>`` (50256). A shard holds at most ``--shard_tokens`` tokens (default 2^28, 512 MB);
  the train split is ~9B tokens (~17 GB), val ~4M tokens.
* ``meta.json``: tokenizer, vocabulary size, token counts and shard lists.

Split: ``train_test_split(test_size=0.0005, seed=2357)`` of the dataset's single split, as nanoGPT.
``experiments.gpt2.train_gpt2.TokenShards`` reads any number of such shards.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

__all__ = ["ShardWriter", "write_shards", "encode_document", "EOT", "main"]

log = logging.getLogger(__name__)

EOT = 50256                      # <|endoftext|> in the gpt2 encoding
DEFAULT_SHARD_TOKENS = 2 ** 28
WRITE_BATCH = 4096               # documents per write


class ShardWriter:
    """Append token arrays to ``<out_dir>/<split>_NNNNNN.bin`` files of at most ``shard_tokens`` tokens each."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir, self.split, self.shard_tokens = Path(out_dir), split, shard_tokens
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.paths: List[Path] = []
        self.total = 0
        self._file = None
        self._in_shard = 0

    def _next_file(self):
        if self._file is not None:
            self._file.close()
        path = self.out_dir / f"{self.split}_{len(self.paths):06d}.bin"
        self.paths.append(path)
        self._file = open(path, "wb")
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
            raise ValueError("token ids must lie in [0, 65535] to be stored as uint16")
        tokens = tokens.astype("<u2", copy=False)
        while tokens.size:
            if self._file is None or self._in_shard == self.shard_tokens:
                self._next_file()
            n = min(tokens.size, self.shard_tokens - self._in_shard)
            self._file.write(tokens[:n].tobytes())
            self._in_shard += n
            self.total += n
            tokens = tokens[n:]

    def close(self) -> List[Path]:
        if self._file is not None:
            self._file.close()
            self._file = None
        return self.paths

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_shards(documents: Iterable[np.ndarray], out_dir: Path, split: str,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Dict[str, object]:
    """Write already-tokenized documents (EOT included) as shards; returns ``{"tokens", "shards"}``."""
    with ShardWriter(out_dir, split, shard_tokens) as writer:
        for doc in documents:
            writer.write(doc)
    return {"tokens": writer.total, "shards": [p.name for p in writer.paths]}


def encode_document(text: str, enc) -> np.ndarray:
    """GPT-2 BPE ids of ``text`` followed by ``<|endoftext|>`` (special tokens in the text are not parsed)."""
    ids = enc.encode_ordinary(text)
    ids.append(enc.eot_token)
    return np.array(ids, dtype=np.uint16)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", type=Path, default=Path("data/openwebtext"))
    p.add_argument("--num_proc", type=int, default=8, help="tokenizer processes")
    p.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    p.add_argument("--val_fraction", type=float, default=0.0005)
    p.add_argument("--split_seed", type=int, default=2357)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    import tiktoken
    from datasets import load_dataset   # pip install datasets (network needed)
    from tqdm import tqdm

    enc = tiktoken.get_encoding("gpt2")
    assert enc.eot_token == EOT and enc.n_vocab == 50257
    dataset = load_dataset("openwebtext", num_proc=args.num_proc)
    splits = dataset["train"].train_test_split(test_size=args.val_fraction, seed=args.split_seed, shuffle=True)
    splits["val"] = splits.pop("test")
    def tokenize(example):
        ids = encode_document(example["text"], enc)
        return {"ids": ids, "len": len(ids)}

    tokenized = splits.map(tokenize, remove_columns=["text"], desc="tokenizing", num_proc=args.num_proc)
    meta: Dict[str, object] = {"tokenizer": "tiktoken gpt2", "vocab_size": enc.n_vocab, "eot": EOT,
                               "dtype": "uint16 little-endian", "splits": {}}
    for split, ds in tokenized.items():
        n_batches = (len(ds) + WRITE_BATCH - 1) // WRITE_BATCH
        # Many documents per write: one concatenated array per batch of rows (per-row writes are slow).
        chunks = (np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in batch["ids"]])
                  for batch in tqdm(ds.iter(batch_size=WRITE_BATCH), total=n_batches, desc=f"writing {split}",
                                    file=sys.stderr))
        meta["splits"][split] = write_shards(chunks, args.out_dir, split, args.shard_tokens)
        assert meta["splits"][split]["tokens"] == int(np.sum(ds["len"], dtype=np.int64))
        log.info("%s: %d tokens in %d shard(s)", split, meta["splits"][split]["tokens"],
                 len(meta["splits"][split]["shards"]))
    (args.out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


if __name__ == "__main__":
    main()
