"""The functional core: pure update functions over flat tensors.

``displacement`` is the whole update of one bucket of parameters as a pure function of the
gradient, the buffers, the parameters and the hyperparameters (0-D tensors allowed everywhere),
so ``torch.func`` can differentiate it with respect to the hyperparameters and ``torch.compile``
can fuse it. ``apply_update`` is its in-place eager use. The optimizers in ``adapter.py`` and the
hyper-gradient engine are thin layers over these functions.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .family import Family

__all__ = ["flatten", "unflatten_like", "displacement", "needs_param", "apply_update", "CHUNK_NUMEL",
           "default_chunk_numel", "chunk_spans", "chunk_plan", "gather", "scatter_add_", "write_state_",
           "state_slice", "flat_buffer", "free_slot", "STAGGER_BYTES", "device_tensor", "device_scalar"]


def flatten(tensors: Sequence[Tensor], copy: bool = False) -> Tensor:
    """One contiguous 1-D tensor holding ``tensors`` back to back.

    A single contiguous tensor comes back as a view unless ``copy``: the hyper-gradient engine
    keeps the flat tensors as vjp residuals, so they must not alias parameters updated in place.
    """
    if len(tensors) == 1 and not copy:
        return tensors[0].reshape(-1)
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_like(flat: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    """Views of ``flat`` shaped like each tensor of ``like``."""
    chunks = torch.split(flat, [t.numel() for t in like])
    return [c.view(t.shape) for c, t in zip(chunks, like)]


def displacement(family: Family, flat_g: Tensor, state: Mapping[str, Tensor], flat_x: Optional[Tensor],
                 h: Mapping[str, object], t, weight_decay_mode: str, precomputed: Optional[Mapping] = None):
    """The pure update of one bucket: ``(x_t - x_{t-1}, new_state)`` for flat tensors.

    ``h`` holds the family's coefficients plus ``"lr"`` and ``"weight_decay"``; every entry may be a
    0-D tensor that ``torch.func`` differentiates. ``flat_x`` may be ``None`` when neither the rule
    nor the weight decay reads it. Implements (see ``Family``)::

        decoupled:  x_t - x = -lr (d(g) + wd x)
        l2:         x_t - x = -lr d(g + wd x)
        proximal:   x_t - x = (x - lr d(g)) / (1 + lr wd) - x
    """
    lr, wd = h["lr"], h["weight_decay"]
    decay = not (isinstance(wd, (int, float)) and wd == 0)
    if decay and weight_decay_mode == "l2":
        flat_g = flat_g + wd * flat_x
    direction, new_state = family.update(flat_g, state, flat_x, h, t, precomputed)
    if decay and weight_decay_mode == "decoupled":
        delta = -lr * (direction + wd * flat_x)
    elif decay and weight_decay_mode == "proximal":
        delta = (flat_x - lr * direction) / (1 + lr * wd) - flat_x
    else:
        delta = -lr * direction
    return delta, new_state


def needs_param(family: Family, weight_decay, weight_decay_mode: str) -> bool:
    """Whether ``displacement`` reads the flat parameters."""
    return family.uses_param or not (isinstance(weight_decay, (int, float)) and weight_decay == 0)


# Elements per chunk of the eager (non-compiled) update on a CPU. Why chunks: the rule is tens of
# elementwise operations, each of which allocates a temporary; over a whole bucket those are
# parameter-sized (MADA: ~49 per step on the eager path), each a fresh mapping from the OS, so the
# step was bound by page faults (1 s on a 10.75M-parameter model, 17 buffers at peak). Chunks of
# 1 MiB (float32) keep the temporaries in cache and reuse freed memory: 2.7x faster, and the peak
# is the state plus about one buffer. On a GPU the caching allocator reuses its memory and each
# chunk would cost every operation's launch again, so there the default is one chunk.
CHUNK_NUMEL = 1 << 18


# Where the flat buffers of one bucket start, modulo a 4 KiB page, on a CPU. A fused step streams
# S + 2 or more buffers through one loop; allocated as they come, every large buffer starts at the
# same offset in its page (the allocator's 64 bytes), so the i-th element of every stream falls on
# the same 4 KiB offset, and loads and stores of different streams alias in the CPU's
# store-forwarding check (4K aliasing) and compete for the same cache sets. Shifting stream k by
# k * 1088 bytes (17 cache lines: no two of the first 64 streams share an offset) made a
# 9-stream compiled loop 9-13% faster on this machine (3 runs, 10.75M float32 elements).
STAGGER_BYTES = 17 * 64
_PAGE = 4096
# Buffers below this are placed as they come: they stream from cache, and the page of padding
# would be a sizeable share of them.
STAGGER_MIN_BYTES = 1 << 20


def device_tensor(values, dtype: torch.dtype, device) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` (``values``: a number, a list of numbers or
    a tensor) that does not synchronise a GPU with the host. Why: a copy from pageable host memory to
    a GPU first waits for every kernel queued before it (a stream synchronisation), so the scalars an
    optimizer step makes (its step count, hyperparameters, bias corrections) would stall the host
    once each, and the step could not be queued while the backward pass still runs. On CUDA the
    values are staged in pinned memory and copied asynchronously, in stream order (the caching host
    allocator keeps the staging buffer until the copy has run). Elsewhere a plain conversion."""
    device = torch.device(device)
    if isinstance(values, Tensor):
        values = values.detach()
        if device.type != "cuda" or values.device == device:
            return values.to(device=device, dtype=dtype)
        if values.device.type == "cpu":
            values = values.to(dtype).pin_memory()
        return values.to(device=device, dtype=dtype, non_blocking=True)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def device_scalar(value, device) -> Tensor:
    """``value`` (a number or a one-element tensor) as a float64 0-D tensor on ``device``: the form in
    which the fused kernels take their scalars (``device_tensor``: no host synchronisation)."""
    return device_tensor(value, torch.float64, device).reshape(())


def flat_buffer(numel: int, dtype: torch.dtype, device: torch.device, slot: int, fill: Optional[float] = None
                ) -> Tensor:
    """A new 1-D buffer of ``numel`` elements (``fill``: its value, else uninitialized). On a CPU its
    first element sits ``slot * STAGGER_BYTES`` bytes past the allocator's usual offset in a page
    (a view into a storage one page longer), so buffers with different slots do not alias (see
    ``STAGGER_BYTES``). Elsewhere, or below ``STAGGER_MIN_BYTES``, a plain allocation."""
    device = torch.device(device)
    size = torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or numel * size < STAGGER_MIN_BYTES or slot % (_PAGE // 64) == 0:
        if fill is None:
            return torch.empty(numel, dtype=dtype, device=device)
        return torch.full((numel,), fill, dtype=dtype, device=device)
    pad = _PAGE // size
    base = torch.empty(numel + pad, dtype=dtype, device=device)
    start = base.data_ptr() % _PAGE
    want = _slot_offset(slot)
    out = base[((want - start) % _PAGE) // size:][:numel]
    if fill is not None:
        out.fill_(fill)
    return out


def free_slot(buffers: Sequence[Tensor], first: int) -> int:
    """The first ``flat_buffer`` slot from ``first`` on whose page offset none of ``buffers`` starts
    at: a new buffer that streams through one loop with them, placed apart from each (buffers
    trade roles on the fused hyper path, so their slots no longer follow their names)."""
    used = {b.data_ptr() % _PAGE for b in buffers}
    return next(k for k in range(first, first + len(used) + 1) if _slot_offset(k) not in used)


def _slot_offset(slot: int) -> int:
    """Where in its page ``flat_buffer`` starts a buffer of ``slot`` (the allocator's own offset is 64)."""
    return (64 + slot * STAGGER_BYTES) % _PAGE


def default_chunk_numel(chunk_numel: Optional[int], device: torch.device) -> Optional[int]:
    """``chunk_numel`` itself, or for ``None`` the default on ``device``: ``CHUNK_NUMEL`` on a CPU,
    ``None`` (one chunk) elsewhere."""
    if chunk_numel is None:
        return CHUNK_NUMEL if device.type == "cpu" else None
    return _checked(chunk_numel)


def _checked(chunk_numel: int) -> int:
    if isinstance(chunk_numel, bool) or not isinstance(chunk_numel, int) or chunk_numel < 1:
        raise ValueError(f"chunk_numel must be an int >= 1 or None (the device's default), got {chunk_numel!r}")
    return chunk_numel


def chunk_spans(total: int, chunk_numel: Optional[int]) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(total)`` in consecutive chunks of at most ``chunk_numel``
    (``None``: one chunk)."""
    if chunk_numel is None:
        return [(0, total)] if total else []
    _checked(chunk_numel)
    return [(a, min(a + chunk_numel, total)) for a in range(0, total, chunk_numel)]


def chunk_plan(tensors: Sequence[Tensor], chunk_numel: Optional[int]
               ) -> List[Tuple[int, int, List[Tuple[int, int, int]]]]:
    """The chunks of ``tensors`` laid out back to back (as ``flatten`` lays them out), as
    ``(start, stop, pieces)``: ``[start, stop)`` in the flat layout, ``pieces`` the
    ``(tensor index, first, last)`` element ranges it covers, in order. A contiguous tensor may be
    split between chunks; a strided one is never split (its elements are only addressable in its
    own shape), so its chunk may exceed ``chunk_numel`` (``None``: no limit)."""
    if chunk_numel is None:
        chunk_numel = max(1, sum(t.numel() for t in tensors))
    _checked(chunk_numel)
    spans: List[Tuple[int, int, List[Tuple[int, int, int]]]] = []
    offset, room = 0, 0  # room: elements the last chunk can still take
    for i, t in enumerate(tensors):
        n = t.numel()
        if not t.is_contiguous():
            spans.append((offset, offset + n, [(i, 0, n)]))
            offset, room = offset + n, 0
            continue
        first = 0
        while first < n:
            if room == 0:
                spans.append((offset, offset, []))
                room = chunk_numel
            take = min(room, n - first)
            start, stop, pieces = spans[-1]
            spans[-1] = (start, stop + take, pieces + [(i, first, first + take)])
            first, offset, room = first + take, offset + take, room - take
    return spans


def _piece(t: Tensor, first: int, last: int) -> Tensor:
    return t.view(-1)[first:last] if t.is_contiguous() else t.reshape(-1)


def gather(tensors: Sequence[Tensor], pieces: Sequence[Tuple[int, int, int]], dtype: torch.dtype) -> Tensor:
    """A flat tensor of ``dtype`` holding ``pieces`` (``chunk_plan``) of ``tensors`` back to back: a
    view when that is one piece of a contiguous tensor of that dtype, a new tensor otherwise."""
    parts = [_piece(tensors[i], a, b) for i, a, b in pieces]
    if not parts:  # an empty bucket (its scalar states still advance)
        return torch.empty(0, dtype=dtype, device=tensors[0].device)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(dtype)


def scatter_add_(tensors: Sequence[Tensor], pieces: Sequence[Tuple[int, int, int]], flat: Tensor) -> None:
    """``tensors[i][first:last] += flat[...]`` for each piece, in place, ``flat`` laid out as ``gather``
    lays them out (a strided tensor receives its piece in its own shape)."""
    targets, values, offset = [], [], 0
    for i, a, b in pieces:
        t = tensors[i]
        value = flat[offset:offset + b - a]
        if t.is_contiguous():
            targets.append(t.view(-1)[a:b])
            values.append(value)
        else:
            targets.append(t)
            values.append(value.view(t.shape))
        offset += b - a
    torch._foreach_add_(targets, values)


def state_slice(state: Mapping[str, Tensor], start: int, stop: int) -> Dict[str, Tensor]:
    """The buffers' elements ``[start, stop)`` of the flat layout (views); scalar (0-D) buffers whole."""
    return {n: (b if b.dim() == 0 else b[start:stop]) for n, b in state.items()}


def write_state_(chunk: Mapping[str, Tensor], new_state: Mapping[str, Tensor], scalars: Dict[str, Tensor]) -> None:
    """Copy ``new_state`` into the buffers' slices ``chunk`` in place; the new values of scalar (0-D)
    buffers go to ``scalars`` instead (the caller writes them once, after the last chunk). A new
    value that is a view of one of the old buffers (a state defined as another's previous value) is
    copied out first, so no write reads a slice already overwritten."""
    storages = {b.untyped_storage().data_ptr() for b in chunk.values()}
    values = {n: (v.clone() if v.untyped_storage().data_ptr() in storages else v) for n, v in new_state.items()}
    for n, value in values.items():
        if chunk[n].dim() == 0:
            scalars[n] = value
        else:
            chunk[n].copy_(value)


def apply_update(
    family: Family,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Tensor],
    h: Mapping[str, object],
    lr,
    weight_decay: float,
    weight_decay_mode: str,
    t,
    dtype: Optional[torch.dtype] = None,
    chunk_numel: Optional[int] = None,
) -> Mapping[str, Tensor]:
    """One in-place step of ``family`` on a bucket of parameters: the parameters and the flat buffers
    ``state`` are updated in place (returned).

    ``state`` holds flat buffers (1-D, total numel of ``params``; 0-D for scalar states), ``h`` the
    coefficients, ``t`` the 1-based step count. The update is ``displacement``'s, run chunk by chunk
    (``chunk_plan``, ``chunk_numel`` elements each; ``None``: ``default_chunk_numel`` for the
    parameters' device): every operation of the rule is elementwise, so
    the numbers are those of one call over the whole bucket, and the temporaries are chunk-sized. A
    scalar state (0-D, e.g. NAdam's running product) is the same in every chunk and is written once,
    after the last. ``dtype``: compute in it (the buffers' dtype) when it differs from the
    parameters'; the parameters then receive ``x + delta`` rounded once to their own dtype.
    """
    dtype = params[0].dtype if dtype is None else dtype
    hyper = {**h, "lr": lr, "weight_decay": weight_decay}
    read_x = needs_param(family, weight_decay, weight_decay_mode)
    scalars: Dict[str, Tensor] = {}
    chunk_numel = default_chunk_numel(chunk_numel, params[0].device)
    for start, stop, pieces in chunk_plan(params, chunk_numel) or [(0, 0, [])]:
        # Views where they can be: the rule is pure, a new value that is the gradient or the parameter
        # itself (Adan's g_prev, a state defined as ``param``) is copied into its buffer before the
        # parameter is written, and a value that is an old buffer's slice is copied out first.
        flat_g = gather(grads, pieces, dtype)
        flat_x = gather(params, pieces, dtype) if read_x else None
        chunk = state_slice(state, start, stop)
        delta, new_state = displacement(family, flat_g, chunk, flat_x, hyper, t, weight_decay_mode)
        write_state_(chunk, new_state, scalars)
        # in the buffers' dtype: a narrower parameter receives x + delta rounded once
        scatter_add_(params, pieces, delta)
    for n, value in scalars.items():
        state[n].copy_(value)
    return state
