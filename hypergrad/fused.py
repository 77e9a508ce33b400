"""Compiled kernels for hyper-learning on the fused path (``HyperOptimizer(..., fused=True)``).

Two compiled functions per (family, weight-decay mode), each called once per parameter tensor:

* ``partial_hypergradient``: the vjp of the recorded last update at the new gradient,
  ``g_{t+1}^T dDelta_t/dq`` for one tensor (``torch.func.vjp`` traced by ``torch.compile``: the
  recomputation of the update and its reverse pass fuse into one reduction over the tensor), and
  the sum of ``g_{t+1}`` from the same loop, which is the non-finite check of that gradient;
* ``update``: the model update with the fresh coefficients, reading the old buffers and writing
  the new ones into the *other* half of a double buffer, the gradient into the record buffer and
  the parameter in place.

Double buffering is what lets the one-step hypergradient recompute the last update: the buffers
before it (state_{t-1}) stay intact for one step, then become the destination of the next update.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from optimizers import Family
from optimizers.compiled import TensorKernel
from optimizers.expr import grad
from optimizers.functional import displacement

__all__ = ["HyperKernels"]


def _partial(family, mode, names, learn, g_old, old_states, cotangent, q, fixed, t):
    state = dict(zip(names, old_states))
    zero = torch.zeros((), dtype=g_old.dtype, device=g_old.device)  # x enters the update additively

    def delta_of(qv):
        h = dict(fixed)
        for i, n in enumerate(learn):
            h[n] = qv[i]
        return displacement(family, g_old, state, zero, h, t, mode)[0]

    _, vjp_fn = torch.func.vjp(delta_of, q)
    # The sum of the cotangent (the new gradient) rides along in the same loop: it is the
    # non-finite check of that gradient, at no extra pass over memory.
    return vjp_fn(cotangent)[0], cotangent.sum()


def _update(family, mode, names, x, g, old_states, new_states, g_store, h, t, precomputed):
    state = dict(zip(names, old_states))
    if mode == "l2":  # the record keeps the effective gradient g + wd x, so no copy of x is needed
        g = g + h["weight_decay"] * x
        h = {**h, "weight_decay": torch.zeros_like(h["weight_decay"])}
    if g_store is not None:  # None: a state buffer of the family is the gradient copy (see HyperKernels)
        g_store.copy_(g)
    delta, new_state = displacement(family, g, state, x, h, t, mode, precomputed)
    for name, buf in zip(names, new_states):
        buf.copy_(new_state[name])
    x.add_(delta)


class HyperKernels:
    """The two compiled kernels of one family and weight-decay mode.

    Each is a ``TensorKernel``: traced into a graph over its tensor arguments only, so a call costs
    a guard check of those tensors (the family and the hyperparameter names are baked in). The
    names of the hyperparameters fix the order of the scalar arguments; a kernel is built per
    distinct set of names (in practice one).
    """

    def __init__(self, family: Family, mode: str, learn: Sequence[str]):
        if family.uses_param:
            raise ValueError(f"fused hyper-learning: family {family.name!r} reads the parameter x; use fused=False")
        if any(s.scalar for s in family.states):
            raise ValueError(f"fused hyper-learning: family {family.name!r} has scalar buffers; use fused=False")
        self.family, self.mode, self.learn = family, mode, tuple(learn)
        self.names = family.state_names
        # A buffer defined as the gradient itself (MADA's and Adan's g_prev) holds, after an update,
        # exactly the gradient that the next vjp needs: it doubles as the record (one buffer less
        # to keep and to write per step).
        self.gradient_state = next((s.name for s in family.states if s.definition is grad and not s.scalar), None)
        self._tag = "".join(ch if ch.isalnum() else "_" for ch in f"{family.name}_{mode}")
        self._kernels: Dict[tuple, TensorKernel] = {}

    def _partial_kernel(self, fixed_names: Tuple[str, ...]) -> TensorKernel:
        key = ("partial", fixed_names)
        kern = self._kernels.get(key)
        if kern is None:
            family, mode, names, learn, S = self.family, self.mode, self.names, self.learn, len(self.names)

            def partial(g_old, *rest):
                old_states, (cotangent, q), fixed, t = rest[:S], rest[S:S + 2], rest[S + 2:-1], rest[-1]
                return _partial(family, mode, names, learn, g_old, old_states, cotangent, q,
                                dict(zip(fixed_names, fixed)), t)

            kern = self._kernels[key] = TensorKernel(partial, f"hyper_partial_{self._tag}")
        return kern

    def _update_kernel(self, h_names: Tuple[str, ...], pre_ids: Tuple[int, ...], store: bool) -> TensorKernel:
        key = ("update", h_names, pre_ids, store)
        kern = self._kernels.get(key)
        if kern is None:
            family, mode, names, S, H = self.family, self.mode, self.names, len(self.names), len(h_names)

            def update(x, g, *rest):
                old, new, rest = rest[:S], rest[S:2 * S], rest[2 * S:]
                g_store, rest = (rest[0], rest[1:]) if store else (None, rest)
                h, t, pre = rest[:H], rest[H], rest[H + 1:]
                _update(family, mode, names, x, g, old, new, g_store, dict(zip(h_names, h)), t,
                        dict(zip(pre_ids, pre)))

            kern = self._kernels[key] = TensorKernel(update, f"hyper_update_{self._tag}")
        return kern

    def partial_hypergradient(self, g_old: Tensor, old_states: Sequence[Tensor], cotangent: Tensor, q: Tensor,
                              fixed: Mapping[str, Tensor], t: Tensor) -> Tuple[Tensor, Tensor]:
        """``(g_{t+1}^T dDelta_t/dq, sum(g_{t+1}))`` for one tensor."""
        if self.mode == "l2":
            fixed = {**fixed, "weight_decay": torch.zeros_like(fixed["weight_decay"])}
        kern = self._partial_kernel(tuple(fixed))
        return kern(g_old, *old_states, cotangent, q, *fixed.values(), t)

    def scalars(self, h: Mapping[str, Tensor], t: Tensor) -> Dict[int, Tensor]:
        """Scalar subexpressions (bias corrections...) for ``update``: computed once per step and
        tensor set, not once per element inside the kernel."""
        return {uid: v if isinstance(v, Tensor) else torch.tensor(float(v), dtype=torch.float64)
                for uid, v in self.family.scalar_values(h, t).items()}

    def update(self, x: Tensor, g: Tensor, old_states: Sequence[Tensor], new_states: Sequence[Tensor],
               g_store: Optional[Tensor], h: Mapping[str, Tensor], t: Tensor, precomputed: Mapping[int, Tensor]):
        kern = self._update_kernel(tuple(h), tuple(precomputed), g_store is not None)
        store = () if g_store is None else (g_store,)
        kern(x, g, *old_states, *new_states, *store, *h.values(), t, *precomputed.values())
