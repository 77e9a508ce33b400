"""Fused update kernels: one compiled, in-place kernel per parameter tensor (or run of small ones).

An eager step runs the rule's ~10-40 elementwise operations one after another, each reading and
writing a temporary (chunk-sized, ``functional.apply_update``); on a CPU the step is then
dominated by memory traffic and by the dispatch of each operation. Inductor (through ``optimizers.compiled.TensorKernel``)
fuses the whole rule ``displacement`` plus the in-place writes of the new buffers and of the
parameter into one loop: each buffer is read once and written once, which is the memory-bandwidth
floor of the rule.

Hyperparameters and the step count enter as 0-D float64 tensors, so changing a value (an LR
scheduler, a learned coefficient) never recompiles; shapes are dynamic, so one compilation serves
every parameter tensor of a dtype.

Buffers of another dtype than the parameter (``state_dtype``: float32 buffers for bfloat16 parameters)
run a second kernel, traced on first use, that upcasts the parameter and the gradient, computes the
update in the buffers' dtype and writes ``x + delta`` rounded once to the parameter's dtype.

A scalar buffer (NAdam's running product of momentum factors) is shared by every tensor of a
bucket: each kernel reads it at its value before the step, and it is advanced once per bucket
after them.
"""
from __future__ import annotations

import logging
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .compiled import SegmentPlan, TensorKernel
from .functional import device_scalar, displacement
from .family import Family

__all__ = ["FusedKernel"]

log = logging.getLogger(__name__)


def _kernel(family, mode, names, x, g, states, h, t, precomputed, written):
    """The rule in place on one tensor. ``states`` are the buffers by ``names``; only the first
    ``written`` (the parameter-shaped ones) are written: a scalar buffer (NAdam's running product)
    is shared by the bucket, read here at its value before the step, and advanced once per bucket."""
    state = dict(zip(names, states))
    delta, new_state = displacement(family, g, state, x, h, t, mode, precomputed)
    for name in names[:written]:
        state[name].copy_(new_state[name])
    x.add_(delta)


def _kernel_wide(family, mode, names, x, g, states, h, t, precomputed, written, dtype):
    """``_kernel`` computing in ``dtype`` (the buffers'), for parameters of a narrower dtype."""
    state = dict(zip(names, states))
    xw = x.to(dtype)
    delta, new_state = displacement(family, g.to(dtype), state, xw, h, t, mode, precomputed)
    for name in names[:written]:
        state[name].copy_(new_state[name])
    x.copy_(xw + delta)  # one rounding, to the parameter's dtype


class FusedKernel:
    """``kernel(params, grads, flat buffers, h, t)``: the rule applied in place, one compiled call per
    tensor, or per run of small tensors (``optimizers.compiled.segments``: packed into a flat copy and
    copied back, since a call costs ~20-30 us whatever its size).

    The kernels are ``TensorKernel``s: traced into graphs over tensors only, so that a call guards its
    tensor arguments and not the family's expression graph.
    """

    def __init__(self, family: Family, weight_decay_mode: str):
        self.family = family
        self.mode = weight_decay_mode
        # parameter-shaped buffers first, then the scalar ones (read-only inside the kernels)
        self.tensor_names = tuple(s.name for s in family.states if not s.scalar)
        self.scalar_names = tuple(s.name for s in family.states if s.scalar)
        self.names = self.tensor_names + self.scalar_names
        self._tag = "".join(ch if ch.isalnum() else "_" for ch in f"fused_{family.name}_{weight_decay_mode}")
        self._kernels: Dict[tuple, TensorKernel] = {}

    def _kernel(self, wide: Optional[torch.dtype], h_names: tuple, pre_ids: tuple) -> TensorKernel:
        """The traced kernel for these scalar names; ``wide``: the update's dtype when it is not the
        parameters' (``state_dtype``)."""
        key = (wide, h_names, pre_ids)
        kern = self._kernels.get(key)
        if kern is None:
            family, mode, names, S, H = self.family, self.mode, self.names, len(self.names), len(h_names)
            written = len(self.tensor_names)

            def kernel(x, g, *rest):
                states, h, t, pre = list(rest[:S]), dict(zip(h_names, rest[S:S + H])), rest[S + H], rest[S + H + 1:]
                if wide is None:
                    _kernel(family, mode, names, x, g, states, h, t, dict(zip(pre_ids, pre)), written)
                else:
                    _kernel_wide(family, mode, names, x, g, states, h, t, dict(zip(pre_ids, pre)), written, wide)

            kern = self._kernels[key] = TensorKernel(kernel, self._tag + ("" if wide is None else "_wide"))
        return kern

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor], flat: Mapping[str, Tensor],
                 h: Mapping[str, object], t: float, dtype: Optional[torch.dtype] = None,
                 plan: Optional[SegmentPlan] = None):
        """``params``/``grads``: the bucket's tensors, laid out back to back in the flat buffers ``flat``
        (name -> 1-D buffer). ``dtype``: the dtype of the buffers and of the update (``state_dtype``),
        when it is not the parameters'. ``plan``: the bucket's ``SegmentPlan`` over ``params``, kept
        by the caller from step to step (default: one made for this call)."""
        ref = params[0]
        # scalar subexpressions (bias corrections...) once per step, not once per element: in Python
        # floats when the hyperparameters are plain numbers (the usual case; no 0-D tensor operations;
        # a tensor one, an LR scheduler's on the GPU say, is never read back to the host). Not with
        # scalar buffers (NAdam's product), which advance below through the family's update
        # in float64 tensors.
        numbers = not self.scalar_names and all(type(v) in (float, int) for v in h.values())
        pre = self.family.scalar_numbers(h, float(t)) if numbers else None
        if pre is not None:
            scalars, t = {k: float(v) for k, v in h.items()}, float(t)
        else:
            scalars = {k: device_scalar(v, ref.device) for k, v in h.items()}
            t = device_scalar(float(t), ref.device)
            pre = {uid: device_scalar(v, ref.device) for uid, v in self.family.scalar_values(scalars, t).items()}
        bufs = [flat[n] for n in self.tensor_names]
        kern = self._kernel(None if dtype in (None, ref.dtype) else dtype, tuple(scalars), tuple(pre))
        before = [flat[n].clone() for n in self.scalar_names]  # every tensor reads them before the step
        # stacked once for all segments (numbers: float64 on the parameters' device)
        bound = kern.bind(*before, *scalars.values(), t, *pre.values(), device=ref.device)
        plan = SegmentPlan(params) if plan is None else plan
        plan.check(params)
        views = [plan.views(b) for b in bufs]
        calls, finishes = [], []
        for i in range(len(plan.segments)):
            x, g, finish = plan.tensors(i, params, grads)
            calls.append(bound.prepare(x, g, *[v[i] for v in views]))
            finishes.append(finish)
        for call in calls:  # back to back: the Python between kernels runs cache-cold (SegmentPlan)
            call()
        for finish in finishes:
            finish()
        if self.scalar_names:  # advanced once per bucket (they do not depend on the elements)
            # A one-element stand-in for the parameter-shaped buffers: the scalar ones depend on
            # coefficients, the step and themselves only.
            one = {s.name: torch.full((1,), s.init, dtype=before[0].dtype, device=ref.device)
                   for s in self.family.states if not s.scalar}
            zero = torch.zeros(1, dtype=before[0].dtype, device=ref.device)
            _, new = displacement(self.family, zero, {**one, **dict(zip(self.scalar_names, before))}, zero, scalars, t,
                                  self.mode, pre)
            for n in self.scalar_names:
                flat[n].copy_(new[n])
