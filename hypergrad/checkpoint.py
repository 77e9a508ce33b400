"""Safe checkpoints: atomic, integrity-checked, and free of pickled objects.

* ``save(path, payload)`` writes an ordinary ``torch.save`` file holding
  ``{"format": FORMAT, "sha256": digest, "payload": payload}``, where ``payload`` is a dict of
  tensors, numbers, strings, lists and dicts and ``digest`` hashes every key, value and tensor
  byte of it. It is written to a temporary file in the same folder, flushed and fsynced, then
  ``os.replace``d over ``path``: a crash while writing leaves the previous checkpoint intact. The
  file loads with plain ``torch.load(path, weights_only=True)``.
* ``load(path)`` reads with ``torch.load(weights_only=True)`` (a file crafted to run code on load
  is refused, not run) and recomputes the digest: a truncated or modified file is a
  ``CheckpointError`` naming the file (torch's zip format does not notice a flipped byte inside a
  tensor; the digest does).
* ``restore(model, optimizer, payload)`` validates the model's keys and shapes and the optimizer
  state's structure *before* changing anything, so a mismatched checkpoint leaves the running
  model and optimizer untouched.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from optimizers import dtensor

__all__ = ["CheckpointError", "save", "load", "restore", "FORMAT"]

FORMAT = "hypergrad-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, tampered with, or for another model/optimizer."""


def _digest(obj) -> str:
    """SHA-256 over a canonical walk of plain data and tensor bytes (independent of pickling)."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, Mapping):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[" if isinstance(x, list) else b"(")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(f"{type(x).__name__}:{x!r}".encode())

    walk(obj)
    return h.hexdigest()


def save(path: os.PathLike, payload: Mapping[str, Any]) -> None:
    """Atomically write ``payload`` (plain data and tensors only) to ``path``."""
    path = Path(path)
    payload = dict(payload)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "sha256": _digest(payload), "payload": payload}, f)
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
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {path} holds something other than tensors and plain data; refused "
                              f"(weights_only loading): {err}") from err
    except Exception as err:  # torch reports truncation and foreign files as assorted errors
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint (truncated, modified, or "
                              f"written by something else): {type(err).__name__}: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT or "payload" not in data:
        raise CheckpointError(f"{path} is not a hypergrad checkpoint (format {FORMAT!r} expected)")
    if _digest(data["payload"]) != data.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: its content does not match its SHA-256 digest "
                              f"(modified after it was written)")
    return data["payload"]


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
        # a DTensor (FSDP2) parameter's buffers are this rank's shards: compare with the local shape
        sizes = {i: dtensor.local(p).shape
                 for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        for i, entry in saved.get("state", {}).items():
            for name, value in entry.items():
                if isinstance(value, torch.Tensor) and value.dim() and i in sizes and value.shape != sizes[i]:
                    raise CheckpointError(f"checkpoint optimizer buffer {name!r} of parameter {i} has shape "
                                          f"{tuple(value.shape)}, the parameter {tuple(sizes[i])}")
    model.load_state_dict(state)
    if optimizer is not None:
        optimizer.load_state_dict(payload[optimizer_key])
