"""Safe checkpoints: atomic, integrity-checked, and free of pickled objects.

* ``save(path, payload)`` writes ``MAGIC + sha256(body) + body`` where ``body`` is ``torch.save``
  of a dict of tensors, numbers, strings, lists and dicts, to a temporary file in the same folder,
  flushes and fsyncs it, then ``os.replace``s it over ``path``: a crash while writing leaves the
  previous checkpoint intact.
* ``load(path)`` checks the header and the digest (a truncated or modified file is a
  ``CheckpointError`` naming the file, before anything is unpickled), then reads the body with
  ``torch.load(weights_only=True)``: a file crafted to run code on load is refused, not run.
* ``restore(model, optimizer, payload)`` validates the model's keys and shapes and the optimizer
  state's structure *before* changing anything, so a mismatched checkpoint leaves the running
  model and optimizer untouched.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

__all__ = ["CheckpointError", "save", "load", "restore"]

MAGIC = b"HYPERGRAD-CKPT-1\n"
_DIGEST = 32


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, tampered with, or for another model/optimizer."""


def save(path: os.PathLike, payload: Mapping[str, Any]) -> None:
    """Atomically write ``payload`` (plain data and tensors only) to ``path``."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    body = buffer.getvalue()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(hashlib.sha256(body).digest())
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load(path: os.PathLike, map_location: Optional[str] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by ``save``; raise ``CheckpointError`` if it is not intact."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a hypergrad checkpoint (missing header); it may be truncated, "
                              f"or written by something else")
    digest, body = data[len(MAGIC):len(MAGIC) + _DIGEST], data[len(MAGIC) + _DIGEST:]
    if len(digest) < _DIGEST or hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: its content does not match its SHA-256 digest "
                              f"(truncated or modified after it was written)")
    try:
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} holds something other than tensors and plain data; refused "
                              f"(weights_only loading): {err}") from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    return payload


def restore(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], payload: Mapping[str, Any],
            model_key: str = "model", optimizer_key: str = "optimizer") -> None:
    """Load ``payload[model_key]`` into ``model`` and ``payload[optimizer_key]`` into ``optimizer``,
    after checking that both fit; on any mismatch nothing is changed."""
    state = payload.get(model_key)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint has no {model_key!r} state dict")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model: missing keys {missing[:5]}, unexpected keys "
                              f"{unexpected[:5]}")
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
           if not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"checkpoint shapes do not fit the model (key, saved, model): {bad[:5]}")
    if optimizer is not None:
        saved = payload.get(optimizer_key)
        if not isinstance(saved, Mapping) or "param_groups" not in saved:
            raise CheckpointError(f"checkpoint has no {optimizer_key!r} state dict")
        ours = optimizer.state_dict()
        if [len(g["params"]) for g in saved["param_groups"]] != [len(g["params"]) for g in ours["param_groups"]]:
            raise CheckpointError("checkpoint optimizer has a different number of parameters per group")
        if ("hyper" in saved) != ("hyper" in ours) or saved.get("hyper", {}).get("signature") != \
                ours.get("hyper", {}).get("signature"):
            raise CheckpointError(f"checkpoint optimizer is a different optimizer: saved "
                                  f"{saved.get('hyper', {}).get('signature')}, running "
                                  f"{ours.get('hyper', {}).get('signature')}")
        sizes = {i: p.shape for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        for i, entry in saved.get("state", {}).items():
            for name, value in entry.items():
                if isinstance(value, torch.Tensor) and value.dim() and i in sizes and value.shape != sizes[i]:
                    raise CheckpointError(f"checkpoint optimizer buffer {name!r} of parameter {i} has shape "
                                          f"{tuple(value.shape)}, the parameter {tuple(sizes[i])}")
    model.load_state_dict(state)
    if optimizer is not None:
        optimizer.load_state_dict(payload[optimizer_key])
