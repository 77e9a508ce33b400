"""Compiled kernels for hyper-learning on the fused path (``HyperOptimizer(..., fused=True)``).

(For MADA on a CPU, ``HyperKernels`` hands both to the hand-written kernels of ``hypergrad.native``
where it can: the vjp, and the update after a recorded one with decoupled weight decay.)

Two compiled functions per (family, weight-decay mode), each called once per parameter tensor
(or packed run of small tensors):

* ``partial_hypergradient``: the vjp of the recorded last update at the new gradient,
  ``g_{t+1}^T dDelta_t/dq`` (``torch.func.vjp`` traced into one loop with its reductions; scalar
  subexpressions hoisted out of it), and the sum of ``g_{t+1}`` from the same loop, which is the
  non-finite check of that gradient. It reads the recorded inputs and writes nothing.
* ``update``: the model update with the fresh coefficients. When the next step will learn from
  it, the buffers are left at the state *before* it and only its gradient is stored: the next vjp
  needs exactly these. The next update first advances the buffers past the recorded update (it
  recomputes that state from them and the stored gradient, in the same loop) and writes them.

For a rule with a state whose new value is the gradient itself (MADA's and Adan's g_prev:
``Family.gradient_states``) the update that advances past a recorded one does not write that state:
its advanced value is the recorded gradient, whose buffer becomes the state's, while the state's old
buffer, read by the advance, receives the new record (``_update``'s ``rotate``). So a hyper-learning
step keeps S + 1 parameter-sized buffers and moves, per parameter, S + 2 reads in the vjp kernel, and
S + 3 reads plus S + 1 writes in the update (every write in place): 3S + 6. Other rules keep S + 2
(the record and the buffer the next one goes to, alternating, because a compiled kernel that reads
a buffer into another one and overwrites it is miscompiled) and move 3S + 7.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from optimizers import Family
from optimizers.compiled import TensorKernel
from optimizers.functional import device_scalar, displacement

from . import native as native_kernel

__all__ = ["HyperKernels"]


def _materialized(v):
    """``v`` itself, computed once into a buffer of its own: ``as_strided`` needs storage, so Inductor
    does not inline the computation of a scalar (a ``pow``, a division...) into each iteration of
    the per-element loop that reads it."""
    return v.as_strided(v.shape, v.stride()) if isinstance(v, Tensor) else v


def _partial(family, mode, names, learn, g_old, old_states, cotangent, q, fixed, t):
    state = dict(zip(names, old_states))
    zero = torch.zeros((), dtype=g_old.dtype, device=g_old.device)  # x enters the update additively
    # The sum of the cotangent (the new gradient) rides along in the loop of the vjp: it is the
    # non-finite check of that gradient, at no extra pass over memory. (Traced first: Inductor then
    # fuses it into that loop rather than into a second pass.)
    cotangent_sum = cotangent.sum()

    def coefficients(qv):
        h = dict(fixed)
        for i, n in enumerate(learn):
            h[n] = qv[i]
        return h

    # Scalar subexpressions (bias corrections, their reciprocals...) are computed once, outside the
    # per-element work, and enter the update as ``precomputed`` values (as in the update kernel):
    # those that read a learned coefficient as 0-D functions of q, differentiated by a 0-D vjp
    # chained after the per-element one; the others as constants. The per-element vjp sees them as
    # leaves: no ``pow`` per element, and no per-element chain rule through them.
    learned = frozenset(learn)
    varying = tuple(uid for uid, reads in family.scalar_coefficients().items() if reads & learned)
    constant = {uid: _materialized(v) for uid, v in family.scalar_values(coefficients(q), t).items()
                if uid not in varying}

    def scalars_of(qv):
        values = family.scalar_values(coefficients(qv), t)
        return tuple(values[uid] for uid in varying)

    def delta_of(qv, sv):
        precomputed = {**constant, **dict(zip(varying, sv))}
        return displacement(family, g_old, state, zero, coefficients(qv), t, mode, precomputed)[0]

    if varying:
        scalars, scalars_vjp = torch.func.vjp(scalars_of, q)
        _, vjp_fn = torch.func.vjp(delta_of, q, tuple(map(_materialized, scalars)))
        partial_q, partial_s = vjp_fn(cotangent)
        partial = partial_q + scalars_vjp(partial_s)[0]
    else:
        _, vjp_fn = torch.func.vjp(lambda qv: delta_of(qv, ()), q)
        partial = vjp_fn(cotangent)[0]
    return partial, cotangent_sum


def _advance(family, mode, g_old, state, h_old, t_old, pre_old):
    """The state after the recorded update, from the state before it and its recorded gradient (with
    L2 decay the effective one, so its weight decay is 0 here; x never enters the state)."""
    h_old = {**h_old, "weight_decay": torch.zeros_like(h_old["weight_decay"])}
    zero = torch.zeros((), dtype=g_old.dtype, device=g_old.device)
    return displacement(family, g_old, state, zero, h_old, t_old, mode, pre_old)[1]


def _update(family, mode, names, x, g, states, g_last, g_store, h, t, precomputed, last, rotate=None):
    """The model update, in place, on buffers that hold either the current state or, ``last`` given
    (the recorded update's scalars ``(h, t, precomputed)``, its gradient ``g_last``), the state
    before the recorded update, which is advanced first. Recording (``g_store``): the buffers are
    left at the state before this update and its gradient goes to ``g_store`` (the next vjp needs
    exactly these); otherwise the buffers advance past it. ``g_store`` is never ``g_last``: a
    buffer read into another one and overwritten in the same compiled kernel is miscompiled.

    ``rotate`` (recording with ``last``, ``g_store`` None): the name of a state whose advanced value
    is the recorded gradient itself (``Family.gradient_states``, MADA's g_prev). That state is not
    written: the caller makes the buffer of ``g_last`` its buffer. Its old buffer, read here by the
    advance, receives this update's gradient instead, and becomes the new record. One parameter-sized
    buffer fewer (S + 1), and one stream fewer to write. (What was miscompiled above is a buffer
    *copied* into another and then overwritten; the old g_prev enters only arithmetic, Adan's
    difference, and the kernel test checks the overwrite: tests/test_fused.py.)"""
    state = dict(zip(names, states))
    if last is not None:
        state = _advance(family, mode, g_last, state, *last)
    if mode == "l2":  # the record keeps the effective gradient g + wd x, so no copy of x is needed
        g = g + h["weight_decay"] * x
        h = {**h, "weight_decay": torch.zeros_like(h["weight_decay"])}
    delta, new_state = displacement(family, g, state, x, h, t, mode, precomputed)
    recording = g_store is not None or rotate is not None
    if not recording or last is not None:  # (recording from current buffers: they stay as they are)
        kept = state if recording else new_state
        for name, buf in zip(names, states):
            buf.copy_(g if name == rotate else kept[name])
    if g_store is not None:
        g_store.copy_(g)
    x.add_(delta)


class HyperKernels:
    """The two compiled kernels of one family and weight-decay mode.

    Each is a ``TensorKernel``: traced into a graph over its tensor arguments only, so a call costs
    a guard check of those tensors (the family and the hyperparameter names are baked in). The
    names of the hyperparameters fix the order of the scalar arguments; a kernel is built per
    distinct set of names (in practice one).

    For MADA on the CPU, ``native`` (default) computes the partial hypergradient, and the update
    after a recorded one with decoupled weight decay, with the hand-written kernels of ``hypergrad.native``
    instead (``self.native``: whether they apply; they run where they could be built).
    """

    def __init__(self, family: Family, mode: str, learn: Sequence[str], native: bool = True):
        if family.uses_param:
            raise ValueError(f"fused hyper-learning: family {family.name!r} reads the parameter x; use fused=False")
        if any(s.scalar for s in family.states):
            raise ValueError(f"fused hyper-learning: family {family.name!r} has scalar buffers; use fused=False")
        self.family, self.mode, self.learn = family, mode, tuple(learn)
        self.names = family.state_names
        # the state whose advanced value is the recorded gradient (MADA's g_prev): ``_update``'s rotate
        self.gradient_state = family.gradient_states[0] if family.gradient_states else None
        self._tag = "".join(ch if ch.isalnum() else "_" for ch in f"{family.name}_{mode}")
        self._kernels: Dict[tuple, TensorKernel] = {}
        # MADA's vjp and update have hand-written CPU kernels (hypergrad.native): they hold for that
        # expression only; the vjp's derivation with x out of it (decoupled or L2 weight decay; not
        # proximal, which scales it), the update with decoupled decay (update_for)
        self.native = bool(native and mode in ("decoupled", "l2") and native_kernel.is_mada(family))

    def _native_on(self, t: Tensor) -> bool:
        """Whether this step's kernels may be the native ones: MADA, on the CPU (``t``'s device), where
        they could be built (on first use)."""
        return self.native and t.device.type == "cpu" and native_kernel.mada_kernels_available()

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

    def _update_kernel(self, h_names: Tuple[str, ...], pre_ids: Tuple[int, ...], record: bool,
                       last_names: Optional[Tuple[Tuple[str, ...], Tuple[int, ...]]],
                       rotate: Optional[str] = None) -> TensorKernel:
        key = ("update", h_names, pre_ids, record, last_names, rotate)
        kern = self._kernels.get(key)
        if kern is None:
            family, mode, names, S, H = self.family, self.mode, self.names, len(self.names), len(h_names)
            stores = record and rotate is None

            def update(x, g, *rest):
                states, rest = rest[:S], rest[S:]
                g_last, rest = (rest[0], rest[1:]) if last_names is not None else (None, rest)
                g_store, rest = (rest[0], rest[1:]) if stores else (None, rest)
                h, t, rest = dict(zip(h_names, rest[:H])), rest[H], rest[H + 1:]
                pre, rest = dict(zip(pre_ids, rest[:len(pre_ids)])), rest[len(pre_ids):]
                last = None
                if last_names is not None:
                    h_last, pre_last = last_names
                    n = len(h_last)
                    last = (dict(zip(h_last, rest[:n])), rest[n], dict(zip(pre_last, rest[n + 1:])))
                _update(family, mode, names, x, g, states, g_last, g_store, h, t, pre, last, rotate)

            kern = self._kernels[key] = TensorKernel(update, f"hyper_update_{self._tag}")
        return kern

    def partial_hypergradient(self, g_old: Tensor, old_states: Sequence[Tensor], cotangent: Tensor, q: Tensor,
                              fixed: Mapping[str, Tensor], t: Tensor) -> Tuple[Tensor, Tensor]:
        """``(g_{t+1}^T dDelta_t/dq, sum(g_{t+1}))`` for one tensor."""
        return self.partial_for(fixed, t)(g_old, old_states, cotangent, q)

    def partial_for(self, fixed: Mapping[str, Tensor], t: Tensor):
        """``partial_hypergradient`` with its scalars bound once: ``(g_old, old_states, cotangent, q)
        -> (partial, sum)``, for every segment of a record (``.prepare(...)``: the call, to make later)."""
        if self.mode == "l2":
            fixed = {**fixed, "weight_decay": torch.zeros_like(fixed["weight_decay"])}

        def generic():
            bound = self._partial_kernel(tuple(fixed)).bind(*fixed.values(), t)
            return _Arranged(bound, lambda g_old, old_states, cotangent, q: (g_old, *old_states, cotangent, q))

        if self._native_on(t):  # (strided tensors go to generic() call by call)
            return native_kernel.MadaPartial(self.names, self.learn, fixed, t, generic)
        return generic()

    def scalars(self, h: Mapping[str, Tensor], t: Tensor) -> Dict[int, Tensor]:
        """Scalar subexpressions (bias corrections...) for ``update``: computed once per step and
        tensor set, not once per element inside the kernel."""
        return {uid: v if isinstance(v, Tensor) else device_scalar(float(v), t.device)
                for uid, v in self.family.scalar_values(h, t).items()}

    def update(self, x: Tensor, g: Tensor, states: Sequence[Tensor], g_last: Optional[Tensor],
               g_store: Optional[Tensor], h: Mapping[str, Tensor], t: Tensor, precomputed: Mapping[int, Tensor],
               last: Optional[Tuple[Mapping[str, Tensor], Tensor, Mapping[int, Tensor]]] = None,
               rotate: bool = False):
        """The model update of one tensor or packed run; see ``_update``. ``last``: ``(h, t,
        precomputed)`` of the recorded update when ``states`` hold the state before it (``g_last``:
        its gradient); ``g_store``: where this update's gradient goes when it is recorded;
        ``rotate`` (recording, with ``last``, no ``g_store``): it goes to the buffer of
        ``self.gradient_state`` instead, whose role the caller gives to ``g_last``'s buffer."""
        record = g_store is not None or rotate
        self.update_for(h, t, precomputed, last, record, rotate)(x, g, states, g_last, g_store)

    def can_rotate(self, last: Optional[object], record: bool) -> bool:
        """Whether a recording update after a recorded one (``last``: its record or its scalars, None
        if there was none) can rotate its buffers (``_update``)."""
        return record and last is not None and self.gradient_state is not None

    def update_for(self, h: Mapping[str, Tensor], t: Tensor, precomputed: Mapping[int, Tensor],
                   last: Optional[Tuple[Mapping[str, Tensor], Tensor, Mapping[int, Tensor]]], record: bool,
                   rotate: bool = False):
        """``update`` with its scalars bound once: ``(x, g, states, g_last, g_store) -> None``, for every
        segment of a bucket (``g_last`` given exactly when ``last`` is; ``g_store`` when recording
        without ``rotate``; ``.prepare(...)``: the call, to make later)."""
        if rotate and not self.can_rotate(last, record):
            raise ValueError(f"rotate needs record=True, the last update and a family with a state that is the "
                             f"gradient (family {self.family.name!r}: {self.family.gradient_states})")
        def generic():
            last_names = None if last is None else (tuple(last[0]), tuple(last[2]))
            kern = self._update_kernel(tuple(h), tuple(precomputed), record, last_names,
                                       self.gradient_state if rotate else None)
            tail = () if last is None else (*last[0].values(), last[1], *last[2].values())
            bound = kern.bind(*h.values(), t, *precomputed.values(), *tail)
            stores = record and not rotate

            def arrange(x, g, states, g_last, g_store):
                if (g_last is None) != (last is None) or (g_store is None) == stores:
                    raise ValueError("g_last and last go together, and g_store with record (unless rotating)")
                return (x, g, *states, *(b for b in (g_last, g_store) if b is not None))

            return _Arranged(bound, arrange)

        # MADA's update after a recorded one with decoupled decay has a native CPU kernel: rotating (every
        # step after the first when every step learns), or not recording (a learning step of hyper_interval > 1)
        if (rotate or (last is not None and not record)) and self.mode == "decoupled" and self._native_on(t):
            return native_kernel.MadaUpdate(self.names, h, t, last[0], last[1], record, generic)
        return generic()

    def advance(self, g_old: Tensor, states: Sequence[Tensor], h: Mapping[str, Tensor], t: Tensor,
                precomputed: Mapping[int, Tensor]) -> Dict[str, Tensor]:
        """The state after a recorded update (new tensors), eagerly: for ``state_dict`` and for a
        recorded bucket that does not step again."""
        return _advance(self.family, self.mode, g_old, dict(zip(self.names, states)), dict(h), t, dict(precomputed))


class _Arranged:
    """A bound kernel called with structured arguments (``arrange`` lays them out as its tensors):
    ``f(*args)`` runs it, ``f.prepare(*args)`` returns the call to make later
    (``optimizers.compiled.BoundKernel.prepare``)."""

    def __init__(self, bound, arrange):
        self.bound, self.arrange = bound, arrange

    def __call__(self, *args):
        return self.prepare(*args)()

    def prepare(self, *args):
        return self.bound.prepare(*self.arrange(*args))
