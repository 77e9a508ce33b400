"""Fused update kernels: one compiled, in-place kernel per parameter tensor.

An eager step runs the rule's ~10-40 elementwise operations one after another, each reading and
writing a full parameter-sized temporary; on a CPU the step is then dominated by memory traffic
and by page faults for the temporaries. ``torch.compile`` (Inductor) fuses the whole rule
``displacement`` plus the in-place writes of the new buffers and of the parameter into one loop:
each buffer is read once and written once, which is the memory-bandwidth floor of the rule.

Hyperparameters and the step count enter as 0-D float64 tensors, so changing a value (an LR
scheduler, a learned coefficient) never recompiles; shapes are dynamic, so one compilation serves
every parameter tensor of a dtype.

Buffers of another dtype than the parameter (``state_dtype``: float32 buffers for bfloat16 parameters)
run a second kernel, compiled on first use, that upcasts the parameter and the gradient, computes the
update in the buffers' dtype and writes ``x + delta`` rounded once to the parameter's dtype.
"""
from __future__ import annotations

import logging
import types
from typing import Dict, List, Mapping, Sequence

import torch
from torch import Tensor

from .functional import displacement
from .family import Family

__all__ = ["FusedKernel", "supports_fused"]

log = logging.getLogger(__name__)


def supports_fused(family: Family) -> bool:
    """Scalar buffers (NAdam's running product) are shared by a bucket and cannot be updated per tensor."""
    return not any(s.scalar for s in family.states)


def _kernel(family, mode, names, x, g, states, h, t, precomputed):
    state = dict(zip(names, states))
    delta, new_state = displacement(family, g, state, x, h, t, mode, precomputed)
    for name in names:
        state[name].copy_(new_state[name])
    x.add_(delta)


def _kernel_wide(family, mode, names, x, g, states, h, t, precomputed, dtype):
    """``_kernel`` computing in ``dtype`` (the buffers'), for parameters of a narrower dtype."""
    state = dict(zip(names, states))
    xw = x.to(dtype)
    delta, new_state = displacement(family, g.to(dtype), state, xw, h, t, mode, precomputed)
    for name in names:
        state[name].copy_(new_state[name])
    x.copy_(xw + delta)  # one rounding, to the parameter's dtype


def _compile(fn, name: str):
    code = fn.__code__.replace(co_name=name)
    return torch.compile(types.FunctionType(code, fn.__globals__, code.co_name), dynamic=True, fullgraph=True)


class FusedKernel:
    """``kernel(params, grads, state views, h, t)``: the rule applied in place, one compiled call per tensor.

    Each instance compiles its own copy of the kernel's code object: Dynamo keeps a bounded cache
    of compiled variants per code object, and a process that builds many families (a benchmark, a
    test suite) would otherwise exhaust it and silently fall back to eager execution.
    """

    def __init__(self, family: Family, weight_decay_mode: str):
        if not supports_fused(family):
            raise ValueError(f"family {family.name!r} has scalar buffers {[s.name for s in family.states if s.scalar]}; "
                             f"the fused path updates tensors one at a time and does not support them (use fused=False)")
        self.family = family
        self.mode = weight_decay_mode
        self.names = family.state_names
        self._tag = f"fused_{family.name.replace('@', '_').replace(',', '_').replace('=', '_').replace('.', '_')}"
        self._compiled = _compile(_kernel, self._tag)
        self._compiled_wide = None  # compiled on first use (state_dtype wider than the parameters)

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[Mapping[str, Tensor]],
                 h: Mapping[str, object], t: float, state_dtype=None):
        ref = params[0]
        if state_dtype is not None and state_dtype != ref.dtype:
            return self._call_wide(params, grads, states, h, t, state_dtype)
        scalars = {k: _scalar(v, ref) for k, v in h.items()}
        t = torch.tensor(float(t), dtype=torch.float64, device=ref.device)
        # scalar subexpressions (bias corrections...) once per step, not once per element
        pre = {uid: _scalar(v, ref) for uid, v in self.family.scalar_values(scalars, t).items()}
        for p, g, s in zip(params, grads, states):
            if p.is_contiguous() and g.is_contiguous():
                self._compiled(self.family, self.mode, self.names, p.view(-1), g.view(-1),
                               [s[n].view(-1) for n in self.names], scalars, t, pre)
            else:  # a strided parameter: same kernel on the tensor's own shape
                self._compiled(self.family, self.mode, self.names, p, g.contiguous(), [s[n] for n in self.names],
                               scalars, t, pre)

    def _call_wide(self, params, grads, states, h, t, dtype):
        if self._compiled_wide is None:
            self._compiled_wide = _compile(_kernel_wide, self._tag + "_wide")
        ref = params[0]
        scalars = {k: _scalar(v, ref) for k, v in h.items()}
        t = torch.tensor(float(t), dtype=torch.float64, device=ref.device)
        pre = {uid: _scalar(v, ref) for uid, v in self.family.scalar_values(scalars, t).items()}
        for p, g, s in zip(params, grads, states):
            if p.is_contiguous() and g.is_contiguous():
                self._compiled_wide(self.family, self.mode, self.names, p.view(-1), g.view(-1),
                                    [s[n].view(-1) for n in self.names], scalars, t, pre, dtype)
            else:
                self._compiled_wide(self.family, self.mode, self.names, p, g.contiguous(),
                                    [s[n] for n in self.names], scalars, t, pre, dtype)


def _scalar(value, ref: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(device=ref.device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=ref.device)
