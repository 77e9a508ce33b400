"""Compiled kernels whose calls cost little more than their arithmetic.

``torch.compile`` guards every Python object a compiled function reads, and re-checks those guards
on every call. The update of a ``Family`` walks its expression graph in Python, so a fused kernel
compiled directly carried about two thousand guards (on the expression nodes, their attributes,
the dicts of hyperparameters): 0.1-0.3 ms per call, once per parameter tensor and kernel, which on
a model of many small tensors cost more than the arithmetic itself.

``TensorKernel`` first traces the kernel with ``make_fx`` (symbolic shapes) into an FX graph of
aten operations on its tensor arguments — the family, the weight-decay mode and every other Python
value are baked into the graph — and compiles that graph, so a call guards only its tensor inputs.
The kernel may write into its arguments (``copy_``, ``add_``): the graph keeps those writes.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = ["TensorKernel", "segments", "segment_tensors", "cat_flat", "SMALL_TENSOR"]


class TensorKernel:
    """``kernel(*tensors)``: ``fn`` traced once per signature (dtype, rank, contiguity and device of
    each argument) into an FX graph, then compiled with dynamic shapes (one compilation serves every
    size). ``fn`` must take tensors only and may not branch on their values.

    0-D arguments (hyperparameters, the step) reach the compiled graph stacked into one vector per
    dtype and device: Dynamo would otherwise guard each 0-D tensor's value (a host read per scalar
    and call, a device synchronisation on a GPU).
    """

    def __init__(self, fn: Callable[..., object], name: str):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn, self.name = fn, name
        self._compiled: Dict[Tuple, Tuple[Callable[..., object], List[int], List[List[int]]]] = {}

    def __call__(self, *tensors: Tensor):
        key = tuple((t.dtype, t.dim(), t.is_contiguous(), t.device) for t in tensors)
        entry = self._compiled.get(key)
        if entry is None:
            entry = self._compiled[key] = self._build(tensors)
        compiled, big, scalar_groups = entry
        return compiled(*[tensors[i] for i in big], *[torch.stack([tensors[i] for i in group])
                                                      for group in scalar_groups])

    def _build(self, tensors: Tuple[Tensor, ...]):
        big = [i for i, t in enumerate(tensors) if t.dim() > 0]
        by_kind: Dict[Tuple, List[int]] = {}
        for i, t in enumerate(tensors):
            if t.dim() == 0:
                by_kind.setdefault((t.dtype, t.device), []).append(i)
        scalar_groups = list(by_kind.values())
        fn, n = self.fn, len(tensors)

        def unpacked(*args):
            full: List[object] = [None] * n
            for j, i in enumerate(big):
                full[i] = args[j]
            for vec, group in zip(args[len(big):], scalar_groups):
                for m, i in enumerate(group):
                    full[i] = vec[m]
            return fn(*full)

        example = [tensors[i] for i in big] + [torch.stack([tensors[i] for i in g]) for g in scalar_groups]
        with torch.no_grad():  # an optimizer kernel: no autograd graph to record around it
            graph = make_fx(unpacked, tracing_mode="symbolic")(*example)  # fake copies: nothing is written
        graph.__class__.__name__ = self.name  # names the kernel in profiles and compile logs
        return torch.compile(graph, dynamic=True, fullgraph=True), big, scalar_groups


# A kernel call costs ~0.1 ms of Python, guards and dispatch whatever its size: below this many
# elements a tensor's update is cheaper packed with its neighbours (copied to a flat tensor and
# back) than given a call of its own. LayerNorm weights and biases are all below it.
SMALL_TENSOR = 1 << 17


def segments(tensors: Sequence[Tensor], groups: Optional[Sequence[Hashable]] = None,
             small: int = SMALL_TENSOR) -> List[Tuple[int, int, List[int]]]:
    """The kernel calls over ``tensors`` laid out back to back in flat buffers, as
    ``(offset, numel, indices)``: a run of consecutive contiguous tensors below ``small`` elements
    and of the same group (``groups[i]``: e.g. their coefficient set) is one call; any other tensor
    has its own."""
    if groups is not None and len(groups) != len(tensors):
        raise ValueError(f"groups has {len(groups)} entries for {len(tensors)} tensors")
    out: List[Tuple[int, int, List[int]]] = []
    packable_run, run_group, offset = False, None, 0
    for i, t in enumerate(tensors):
        n, group = t.numel(), (None if groups is None else groups[i])
        packable = n < small and t.is_contiguous()
        if packable and packable_run and out and group == run_group:
            start, total, idxs = out[-1]
            out[-1] = (start, total + n, idxs + [i])
        else:
            out.append((offset, n, [i]))
            run_group = group
        packable_run = packable
        offset += n
    return out


def cat_flat(tensors: Sequence[Optional[Tensor]], like: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """``tensors`` back to back as one flat tensor of ``dtype`` (``None``: zeros shaped like the
    matching entry of ``like``). A single contiguous tensor of that dtype comes back as a view."""
    if len(tensors) == 1 and tensors[0] is not None and tensors[0].is_contiguous() and tensors[0].dtype == dtype:
        return tensors[0].view(-1)
    parts = [(t if t is not None else torch.zeros_like(ref)).reshape(-1).to(dtype) for t, ref in zip(tensors, like)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _nothing():
    pass


def segment_tensors(params: Sequence[Tensor], grads: Sequence[Tensor], offset: int, numel: int,
                    indices: Sequence[int]) -> Tuple[Tensor, Tensor, Callable[[Tensor], Tensor], Callable[[], None]]:
    """What one kernel call of ``segments`` works on: ``(x, g, view, finish)``.

    ``x``, ``g``: the parameter and its gradient, flat; for a packed run, flat copies; for a strided
    parameter, the tensor itself (the kernel runs on its shape). ``view(buffer)``: this segment's
    slice of a flat buffer, shaped like ``x``. ``finish()``: copies a packed ``x`` back into its
    parameters after the call (nothing otherwise).
    """
    sl = slice(offset, offset + numel)
    p, g = params[indices[0]], grads[indices[0]]
    if len(indices) > 1:
        run = [params[i] for i in indices]
        x = torch.cat([q.view(-1) for q in run])

        def finish():
            torch._foreach_copy_([q.view(-1) for q in run], list(torch.split(x, [q.numel() for q in run])))

        return x, cat_flat([grads[i] for i in indices], run, p.dtype), lambda b: b[sl], finish
    if p.is_contiguous() and g.is_contiguous():
        return p.view(-1), g.view(-1), lambda b: b[sl], _nothing
    return p, g.contiguous(), lambda b: b[sl].view(p.shape), _nothing
