"""Fused update kernels: one compiled, in-place kernel per parameter tensor.

An eager step runs the rule's ~10-40 elementwise operations one after another, each reading and
writing a full parameter-sized temporary; on a CPU the step is then dominated by memory traffic
and by page faults for the temporaries. ``torch.compile`` (Inductor) fuses the whole rule
``displacement`` plus the in-place writes of the new buffers and of the parameter into one loop:
each buffer is read once and written once, which is the memory-bandwidth floor of the rule.

Hyperparameters and the step count enter as 0-D float64 tensors, so changing a value (an LR
scheduler, a learned coefficient) never recompiles; shapes are dynamic, so one compilation serves
every parameter tensor of a dtype.
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
        code = _kernel.__code__.replace(co_name=f"fused_{family.name.replace('@', '_').replace(',', '_').replace('=', '_').replace('.', '_')}")
        fn = types.FunctionType(code, _kernel.__globals__, code.co_name)
        self._compiled = torch.compile(fn, dynamic=True, fullgraph=True)

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[Mapping[str, Tensor]],
                 h: Mapping[str, object], t: float):
        ref = params[0]
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


def _scalar(value, ref: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(device=ref.device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=ref.device)
