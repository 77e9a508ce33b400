"""``HyperOptimizer``: a family that learns its own coefficients while the model trains.

The one-step hypergradient (Baydin et al. 2018; gdtuo; MADA Algorithm 1). At step t the model
moved by ``x_{t-1} = x_{t-2} + Delta(q; g_{t-1}, state_{t-2}, x_{t-2})``. Holding everything but the
coefficients q fixed,

    dF_t/dq = g_t^T dDelta/dq  = vjp of the last update, evaluated at the new gradient g_t.

That vjp is taken by ``torch.func.vjp`` of the *pure* update ``optimizers.displacement`` with
respect to the coefficient vector; its residual (the saved tensors of one update, not of the
model) is kept until the next step supplies g_t. For a tower the cotangent climbs one level per
step, ``d_1 = vjp_0(g_t)``, ``d_{k+1} = vjp_k(d_k)`` (the levels' vjps, on vectors of a few entries,
by ``torch.autograd.grad``: less overhead than functorch's transforms); the updates then run
top-down, each level using the freshly updated hyperparameters of the level above (design.md §2.3).

Two backends give the same numbers:

* ``"functional"`` (default): the fold of ``torch.func.vjp`` closures above; the model-level update
  and its vjp run chunk by chunk (``chunk_numel`` elements, as ``RuleOptimizer``'s update), their sum
  the bucket's, so the temporaries of the recomputed update stay chunk-sized. A recorded update
  leaves its bucket's buffers at the state before it (the record needs exactly that) and keeps a
  copy of its gradient; the next vjp, which recomputes the update and so its new state, writes
  that state into the buffers in place: S + 1 buffers for a rule with S, not 2S + 1;
* ``"graph"`` (gdtuo-style): each level's last update is kept in the autograd graph and one
  ``torch.autograd.grad`` call returns every level's hypergradient.

The user's loop is the ordinary ``zero_grad(); loss.backward(); step()``; no
``create_graph=True`` is needed.
"""
from __future__ import annotations

import contextlib
import logging
import math
import weakref
from numbers import Real
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

import torch.distributed as dist

from optimizers import Family, Interval, Positive, dtensor, get_rule
from optimizers.adapter import RuleOptimizer, displacement, flatten, needs_param, unflatten_like
from optimizers.functional import (chunk_plan, chunk_spans, default_chunk_numel, device_scalar, flat_buffer, free_slot,
                                  gather, state_slice, write_state_)
from optimizers.compiled import SegmentPlan, cat_flat, segments

from .fused import HyperKernels
from .tower import LR_COEFFICIENT, CoefficientLayout, Level, level_update

__all__ = ["HyperOptimizer", "MADA", "HyperAdam", "HyperSGD", "SHARING", "BACKENDS", "NONFINITE"]

log = logging.getLogger(__name__)

SHARING = ("global", "group", "tensor")
NONFINITE = ("skip", "raise", "ignore")
BACKENDS = ("functional", "graph")


class HyperOptimizer(RuleOptimizer):
    """Run ``family`` on the model and learn its coefficients by hyper-gradient descent.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        family: a ``Family`` or a registered rule name (``"mada"``).
        lr, weight_decay, weight_decay_mode: as ``RuleOptimizer``.
        learn: names of the coefficients to learn (default: the family's learnable ones); include
            ``"lr"`` to learn the learning rate (Baydin et al. hypergradient descent).
        tower: the hyper-optimizer: a ``Level`` or a list of levels, bottom first (default
            ``Level("adam", lr=1e-3)``). ``tower[k].learn`` names what ``tower[k+1]`` learns.
        share: ``"global"`` (one set of coefficients, as in the paper), ``"group"`` (one per param
            group) or ``"tensor"`` (one per parameter tensor).
        warmup: number of steps before hyper-learning starts (coefficients stay at their initial
            values until then).
        hyper_interval: learn the coefficients every ``hyper_interval`` steps (default 1: every
            step, as in the paper). Only the update before a hyper-step is recorded, and the next
            step learns from it: the one-step hypergradient ``g_{t+1} . dx_{t+1}/dq`` of that update,
            exactly as with 1. The steps in between run the plain rule with the current
            coefficients and record nothing, so they cost what the rule costs (plus the non-finite
            gradient check, which a learning step gets from its vjp): the average step cost falls
            toward the rule's as ``hyper_interval`` grows (measured in docs/performance.md, table
            (h)). The hyper-optimizer takes one step per hyper-step with its own lr, so the
            coefficients move about ``hyper_interval`` times more slowly per model step.
        clip_hypergrad: if given, each hypergradient entry is clamped to ``[-clip, clip]`` before it
            drives a hyper-step.
        backend: ``"functional"`` or ``"graph"`` (see module docstring).
        hyper_dtype: dtype of the coefficient vectors (default float64 if any parameter is float64,
            else float32).
        nonfinite: what a NaN/Inf does. ``"skip"`` (default): a non-finite gradient skips the whole
            step (counted in ``skipped_steps``), a non-finite hypergradient skips the hyper-step and
            keeps the coefficients (``skipped_hyper_steps``), a non-finite update is not applied
            (``skipped_updates``; on the eager path only: the fused path computes and applies the
            update in place in one loop, so it cannot hold one back; the first later step whose
            gradient the broken parameters make non-finite raises ``FloatingPointError`` naming
            their param group, instead of skipping every step from then on. MADA's update is
            finite for a finite gradient unless a gradient's square overflows, |g| > ~1.8e19 in
            float32, which gradient clipping prevents; where that can happen, or with a family whose
            update can be non-finite otherwise, such as one dividing by the gradient, use
            ``fused=False``); ``"raise"``: ``FloatingPointError``; ``"ignore"``: no checks (and no
            host read of a flag per step).
        state_dtype: dtype of the model optimizer's buffers and update arithmetic, as for
            ``RuleOptimizer`` (``torch.float32`` for bfloat16 parameters); the recorded inputs of the
            last update (gradient, buffers, parameters) are kept in it too, so the hypergradients are
            computed in it. Not supported with ``fused=True`` unless it equals the parameters' dtype.
        native: with ``fused=True``, compute MADA's partial hypergradient, and its update after a
            recorded one, on the CPU with the hand-written kernels of ``hypergrad.native`` (default;
            there the vjp takes about half the compiled ``torch.func`` vjp's time, the update about
            80% of the compiled one's). ``False``: the compiled kernels everywhere. Other families,
            other devices, the proximal weight decay (and L2 decay for the update) use the compiled
            kernels either way, as does a machine without a C compiler (a warning says so).
        **coefficients: initial values of the family's coefficients.

    DTensor parameters (FSDP2, ``fully_shard``) on one 1-D device mesh, with Shard or Replicate
    placements: each rank updates its local shards, and the per-rank partial hypergradients of the
    sharded parameters are summed with one all-reduce per step over the mesh's process group (a
    replicated parameter is counted once), so every rank learns the same coefficients as one
    process would. The non-finite checks are reduced over the group too, so every rank skips the
    same steps. ``state_dict`` then holds this rank's shards of the buffers and records.
    """

    def __init__(self, params, family: Union[str, Family], lr: float = 1e-3, weight_decay: float = 0.0,
                 weight_decay_mode: Optional[str] = None, *, learn: Optional[Sequence[str]] = None,
                 tower: Union[Level, Sequence[Level], None] = None, share: str = "global", warmup: int = 0,
                 hyper_interval: int = 1, clip_hypergrad: Optional[float] = None, backend: str = "functional",
                 hyper_dtype: Optional[torch.dtype] = None, nonfinite: str = "skip", fused: bool = False,
                 state_dtype: Optional[torch.dtype] = None, native: bool = True, **coefficients):
        super().__init__(params, family, lr=lr, weight_decay=weight_decay, weight_decay_mode=weight_decay_mode,
                         fused=fused, state_dtype=state_dtype, **coefficients)
        fam = self.family
        if share not in SHARING:
            raise ValueError(f"share must be one of {SHARING}, got {share!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        if not isinstance(native, bool):
            raise TypeError(f"native must be True or False, got {native!r}")
        self.native = native
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        if isinstance(hyper_interval, bool) or not isinstance(hyper_interval, int) or hyper_interval < 1:
            raise ValueError(f"hyper_interval must be an int >= 1 (learn every that many steps), "
                             f"got {hyper_interval!r}")
        if clip_hypergrad is not None and (isinstance(clip_hypergrad, bool) or not isinstance(clip_hypergrad, Real)
                                           or not clip_hypergrad > 0 or math.isinf(clip_hypergrad)):
            raise ValueError(f"clip_hypergrad must be a finite number > 0 or None, got {clip_hypergrad!r}")
        if learn is not None and not isinstance(learn, (str, tuple, list)):
            raise TypeError(f"learn must be a coefficient name or a list of names, got {learn!r}")
        learn = fam.learnable if learn is None else ((learn,) if isinstance(learn, str) else tuple(learn))
        if hyper_dtype is not None and (not isinstance(hyper_dtype, torch.dtype) or not hyper_dtype.is_floating_point):
            raise TypeError(f"hyper_dtype must be a floating torch.dtype (torch.float32, torch.float64), got {hyper_dtype!r}")
        allowed = ("lr", *fam.coefficients)
        bad = [n for n in learn if n not in allowed]
        if bad:
            raise ValueError(f"learn={list(learn)}: {bad} are not coefficients of {fam.name!r}; allowed: {list(allowed)}")
        if tower is None:
            tower = [Level("adam", lr=1e-3)] if learn else []
        elif isinstance(tower, Level):
            tower = [tower]
        tower = list(tower)
        for i, lv in enumerate(tower):
            if not isinstance(lv, Level):
                raise TypeError(f"tower[{i}] must be a hypergrad.Level, got {type(lv).__name__}")
        if learn and not tower:
            raise ValueError("learn names coefficients but the tower is empty: give a hyper-optimizer Level")
        if not learn and tower:
            raise ValueError("a tower was given but learn is empty: nothing for it to learn")
        for i, lv in enumerate(tower):
            if lv.learn and i == len(tower) - 1:
                raise ValueError(f"tower[{i}] (the top level) has learn={list(lv.learn)}: add a level above it to learn them")
            if not lv.learn and i < len(tower) - 1:
                raise ValueError(f"tower[{i + 1}] has nothing to learn: tower[{i}].learn is empty")
        for n in learn:
            if n != "lr" and not isinstance(fam.coefficients[n].domain, (Interval, Positive)):
                raise ValueError(f"learn: coefficient {n!r} lives on {fam.coefficients[n].domain.describe()}; "
                                 f"only interval-valued coefficients can be learned (fix it, or leave it out of learn)")
        if fused and learn:
            if "lr" in learn:
                raise ValueError("fused=True with 'lr' in learn is not supported (the record would need a copy "
                                 "of x); use fused=False")
            if backend != "functional":
                raise ValueError("fused=True runs the functional backend; backend='graph' needs fused=False")
            if fam.uses_param:
                raise ValueError(f"fused=True: family {fam.name!r} reads the parameter; use fused=False")
            if any(st.scalar for st in fam.states):
                raise ValueError(f"fused=True: family {fam.name!r} has scalar buffers "
                                 f"{[st.name for st in fam.states if st.scalar]}, which the fused hyper-learning "
                                 f"kernels do not support; use fused=False")
        self.learn = tuple(dict.fromkeys(learn))
        self._reduce_group, self._reduce_sharded = None, False
        self._check_params([p for g in self.param_groups for p in g["params"]])
        self.tower: List[Level] = tower
        self.share = share
        self.warmup = warmup
        self.hyper_interval = hyper_interval
        self.clip_hypergrad = clip_hypergrad
        self.backend = backend
        all_params = [p for g in self.param_groups for p in g["params"]]
        if hyper_dtype is None:
            hyper_dtype = torch.float64 if any(p.dtype == torch.float64 for p in all_params) else torch.float32
        device = all_params[0].device if all_params else torch.device("cpu")
        self.hyper_dtype, self.hyper_device = hyper_dtype, device

        # Level-1 vector: the model family's learned coefficients, one set per sharing unit.
        self._param_set: Dict[int, int] = {}
        if share == "global":
            n_sets = 1
            set_groups = [0]
        elif share == "group":
            n_sets = len(self.param_groups)
            set_groups = list(range(n_sets))
        else:
            n_sets = len(all_params)
            set_groups = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        self._assign_sets()
        coefs = tuple(LR_COEFFICIENT if n == "lr" else fam.coefficients[n] for n in self.learn)
        layouts = [CoefficientLayout(self.learn, coefs, n_sets)]
        init = []
        for s in range(n_sets):
            group = self.param_groups[set_groups[s]]
            init += [float(group[n]) for n in self.learn]
        q = [torch.tensor(init, dtype=hyper_dtype, device=device)]
        # Levels >= 2: each level's learned hyperparameters, one global set.
        for lv in tower[:-1]:
            coefs = tuple(lv.coefficient(n) for n in lv.learn)
            layouts.append(CoefficientLayout(lv.learn, coefs, 1))
            q.append(torch.tensor([float(lv.values[n]) for n in lv.learn], dtype=hyper_dtype, device=device))
        self._layouts = layouts
        self._bounds = [lay.bounds(hyper_dtype, device) for lay in layouts]
        self._q: List[Tensor] = q  # q[k-1] is level k's vector (k = 1..L)
        self._scales: List[Optional[Tensor]] = []
        for k, lv in enumerate(tower):
            lay = layouts[k]
            if lv.lr_scale:
                unknown = set(lv.lr_scale) - set(lay.names)
                if unknown:
                    raise ValueError(f"tower[{k}].lr_scale names {sorted(unknown)}, which it does not update; "
                                     f"it updates {list(lay.names)}")
                self._scales.append(torch.tensor([lv.lr_scale.get(n, 1.0) for n in lay.names] * lay.sets,
                                                 dtype=hyper_dtype, device=device))
            else:
                self._scales.append(None)
        self._level_state = [lv.family.init_state(self._q[k]) for k, lv in enumerate(tower)]
        self._level_steps = [0] * len(tower)
        self._hyper_step = 0
        # The inputs of the last updates (held fixed by the one-step hypergradient): per bucket of the
        # model update, and per tower level. The vjp is recomputed from them at the next step, which
        # keeps no autograd graph alive between steps and lets a checkpoint carry them exactly.
        self._records0: Optional[List[Dict]] = None
        self._level_records: List[Optional[Dict]] = [None] * len(tower)
        self._graph_residual: Optional[list] = None  # graph backend: [(params, Delta in the graph)]
        self._graph_leaves: List[Tensor] = []
        self._graph_chain: Optional[List[Tensor]] = None
        self._hypergrads: List[Optional[Tensor]] = [None] * len(tower)
        self.skipped_steps = 0  # steps skipped for a non-finite gradient
        self.skipped_hyper_steps = 0  # hyper-steps skipped for a non-finite hypergradient
        self.skipped_updates = 0  # bucket updates not applied because they were non-finite
        self._lr_at_init: Dict[int, float] = {}
        self._hyper_kernels: Dict[str, HyperKernels] = {}
        self._grad_record: Dict[Tuple[int, ...], List[Tensor]] = {}  # fused path: gradient buffers per bucket
        self._packed_grads: Dict[Tuple, Tensor] = {}  # fused path: this step's packed gradients, vjp -> update
        self._current_cache: Dict[int, Tuple[Dict, Dict[str, Tensor]]] = {}  # fused path: _current_buffer
        self._set_index: Dict[int, Tensor] = {}
        self._index_cache: Dict[Tuple[int, ...], List[int]] = {}  # share='tensor': local numel per tensor
        self._perturbation: Optional[Tuple[int, int, float]] = None  # (level index, entry, amount): gradcheck only

    # ------------------------------------------------------------------ copy / pickle, new groups
    _UNPICKLED = RuleOptimizer._UNPICKLED + ("_param_set", "_index_cache", "_hyper_kernels", "_grad_record",
                                             "_set_index", "_graph_residual", "_graph_chain",
                                             "_graph_leaves", "_reduce_group", "_packed_grads",
                                             "_current_cache")

    def __setstate__(self, state):
        super().__setstate__(state)
        self._index_cache, self._hyper_kernels, self._grad_record, self._set_index = {}, {}, {}, {}
        self._packed_grads, self._current_cache = {}, {}
        self._graph_residual, self._graph_chain, self._graph_leaves = None, None, []
        self._param_set = {}
        self._assign_sets()
        self._reduce_group = None
        self._check_params([p for g in self.param_groups for p in g["params"]])

    def _check_params(self, params: Sequence[Tensor]):
        """What learning coefficients needs of the parameters; sets the all-reduce group of DTensor ones."""
        if not self.learn:  # runs as a RuleOptimizer: any parameters it accepts
            return
        if self.fused and self.state_dtype is not None:
            other = sorted({str(p.dtype) for p in params if p.dtype != self.state_dtype})
            if other:
                raise ValueError(f"fused=True with state_dtype={self.state_dtype} and parameters of dtype {other} is "
                                 f"not supported when learning coefficients (the fused hyper kernels compute in the "
                                 f"parameters' dtype); use fused=False, or state_dtype=None")
        group, sharded = dtensor.reduction_group(params, "HyperOptimizer")
        if group is not None and self.fused:
            raise ValueError("fused=True with DTensor (FSDP2) parameters is not supported when learning coefficients "
                             "(the fused hyper kernels read the global tensors); use fused=False")
        self._reduce_group, self._reduce_sharded = group, sharded

    def _assign_sets(self):
        """Map each parameter to its coefficient set: 0 (global), its group, or its own (tensor)."""
        position = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                self._param_set[id(p)] = 0 if self.share == "global" else gi if self.share == "group" else position
                position += 1

    def add_param_group(self, param_group):
        if hasattr(self, "_layouts") and isinstance(param_group, dict):  # refuse before anything changes
            new = param_group.get("params", [])
            new = [new] if isinstance(new, Tensor) else list(new)
            param_group = {**param_group, "params": new}
            self._check_params([p for g in self.param_groups for p in g["params"]] + new)
        super().add_param_group(param_group)
        if not hasattr(self, "_layouts"):  # during __init__
            return
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        if self.share == "global":
            new_sets = 0
        elif self.share == "group":
            new_sets = 1
        else:
            new_sets = len(group["params"])
        if new_sets and self.learn:
            # Grow the level-1 vector with the new sets' initial values; the level-1 optimizer's
            # buffers grow with zeros/their init, and its record of the last update is dropped
            # (one step without a level-2 hypergradient).
            lay = self._layouts[0]
            init = torch.tensor([float(group[n]) for n in self.learn] * new_sets,
                                dtype=self.hyper_dtype, device=self.hyper_device)
            self._q[0] = torch.cat([self._q[0], init])
            lay.sets += new_sets
            self._bounds[0] = lay.bounds(self.hyper_dtype, self.hyper_device)
            lv = self.tower[0]
            grown = lv.family.init_state(init)
            self._level_state[0] = {n: torch.cat([v, grown[n]]) if v.dim() else v
                                    for n, v in self._level_state[0].items()}
            if self._scales[0] is not None:
                self._scales[0] = torch.tensor([lv.lr_scale.get(n, 1.0) for n in lay.names] * lay.sets,
                                               dtype=self.hyper_dtype, device=self.hyper_device)
            self._level_records[0] = None
            if self._hypergrads[0] is not None:
                self._hypergrads[0] = torch.cat([self._hypergrads[0], torch.zeros_like(init)])
        self._assign_sets()
        self._set_index = {}

    # ------------------------------------------------------------------ public views
    def coefficients(self) -> Dict[str, Tensor]:
        """Current learned coefficients: ``{name: tensor}``, 0-D for ``share="global"``, else one per set."""
        return self._unpack(self._q[0], self._layouts[0]) if self.learn else {}

    def hypergradients(self) -> Dict[str, Tensor]:
        """The last hypergradients dF/dq of the learned coefficients (same layout as ``coefficients``)."""
        if not self.learn or self._hypergrads[0] is None:
            return {}
        return self._unpack(self._hypergrads[0], self._layouts[0])

    def tower_values(self) -> List[Dict[str, Tensor]]:
        """Per level k >= 1 of the tower, the current values of the hyperparameters it learns."""
        return [self._unpack(self._q[k], self._layouts[k]) for k in range(len(self._q))]

    def tower_hypergradients(self) -> List[Dict[str, Tensor]]:
        return [self._unpack(d, self._layouts[k]) if d is not None else {} for k, d in enumerate(self._hypergrads)]

    def _unpack(self, vec: Tensor, layout: CoefficientLayout) -> Dict[str, Tensor]:
        v = vec.detach().reshape(layout.sets, len(layout.names))
        return {n: (v[0, i].clone() if layout.sets == 1 else v[:, i].clone()) for i, n in enumerate(layout.names)}

    # ------------------------------------------------------------------ hyperparameters of each level
    def _model_h(self, group: Mapping, params: Sequence[Tensor], q1: Optional[Tensor],
                 fixed: Optional[Mapping[str, object]] = None,
                 span: Optional[Tuple[int, int]] = None) -> Dict[str, object]:
        """Level-0 hyperparameters of a bucket: learned ones read from ``q1``, the rest ``fixed``
        (by default the group's current values). ``span``: for the elements ``[start, stop)`` of
        the bucket's flat tensors only (a chunk), which matters where they are per element."""
        h: Dict[str, object] = dict(self._fixed_hyperparameters(group) if fixed is None else fixed)
        if q1 is None or not self.learn:
            for n in self.learn:
                h[n] = group[n]
            return h
        lay = self._layouts[0]
        sets = [self._param_set[id(p)] for p in params]
        if all(s == sets[0] for s in sets):
            for n in self.learn:
                h[n] = q1[lay.index(sets[0], n)]
            return h
        # share="tensor" with several tensors in the bucket: expand per element of the flat tensors,
        # which hold the local shards of DTensor parameters (so the local numel).
        key = tuple(map(id, params))
        numels = self._index_cache.get(key)
        if numels is None:
            numels = self._index_cache[key] = [dtensor.local(p).numel() for p in params]
        start, stop = (0, sum(numels)) if span is None else span
        counts, offset = [], 0  # each tensor's number of elements in [start, stop)
        for n_elements in numels:
            counts.append(max(0, min(stop, offset + n_elements) - max(start, offset)))
            offset += n_elements
        inside = [i for i, c in enumerate(counts) if c]
        counts_t = torch.tensor([counts[i] for i in inside], device=q1.device)
        for n in self.learn:
            idx = torch.tensor([lay.index(sets[i], n) for i in inside], device=q1.device)
            h[n] = torch.repeat_interleave(q1[idx], counts_t)
        return h

    def _level_h(self, k: int, q_next: Optional[Tensor]) -> Dict[str, object]:
        """Hyperparameters of tower level k+1 (0-based ``k``): fixed values, learned ones from ``q_next``."""
        lv = self.tower[k]
        h: Dict[str, object] = dict(lv.values)
        h["weight_decay"] = 0.0
        if lv.learn and q_next is not None:
            lay = self._layouts[k + 1]
            for n in lv.learn:
                h[n] = q_next[lay.index(0, n)]
        return h

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        if not self.learn:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._validate_all_groups()
        self._check_learned_lr_untouched()
        self._packed_grads = {}  # (filled by this step's vjp kernels only)
        # On the fused path the vjp kernels read every recorded gradient anyway and also return its
        # sum, so the non-finite check of those gradients costs no extra pass over them (it used
        # to cost a quarter of the step); only gradients outside the records are checked up front.
        deferred = self._deferred_gradient_check()
        if not self._gradients_finite(deferred):
            self.skipped_steps += 1  # x unchanged: the last update's record stays valid for the next gradient
            return loss
        # 1. Hypergradients of the last updates at the new gradient, then 2. the tower top-down.
        all_finite = False  # gradients and hypergradients known finite: one host read per step, not two
        had_records = self._records0 is not None
        if had_records:
            d = self._collect_hypergradients()
            if deferred is not None:
                sums = [torch.stack(self._gradient_sums).to(d[0].dtype)] if self._gradient_sums else []  # none: no records
                all_finite = bool(torch.isfinite(torch.cat(sums + [x.reshape(-1) for x in d])).all())
                if not all_finite and not self._gradients_finite():  # names the culprits, counts the skip
                    self.skipped_steps += 1
                    return loss
        self._hyper_step += 1
        if had_records:
            if all_finite or self._hypergradients_finite(d):
                self._hypergrads = [x.detach() for x in d]
                self._update_tower(d)
            else:
                self.skipped_hyper_steps += 1
        # 3. The model update with the current coefficients, recording its inputs when the next
        #    step will learn from it.
        self._model_update(self._records_update())
        return loss

    def _records_update(self) -> bool:
        """Whether this step's update is recorded, so that the next step learns from it: from step
        ``max(warmup, 1)`` on (counting the steps taken, not the skipped ones), every
        ``hyper_interval``-th step."""
        first = max(self.warmup, 1)
        return self._hyper_step >= first and (self._hyper_step - first) % self.hyper_interval == 0

    def _check_parameters_finite(self):
        """On the fused path, once a gradient is non-finite: raise if parameters are (an update that came
        out non-finite was applied; the update kernel applies it in the loop that computes it, so it
        could not be held back as on the eager path, and skipping steps would not undo it). The
        broken parameters make the loss, and so the gradient, non-finite: this costs nothing until
        then."""
        bad = sorted({gi for gi, g in enumerate(self.param_groups)
                      if not _all_finite([p.detach() for p in g["params"]])})
        if bad:
            raise FloatingPointError(
                f"non-finite parameters in param group(s) {bad}: a non-finite update was applied (fused=True "
                f"computes and applies the update in one loop and cannot hold it back; with MADA this happens "
                f"when a gradient's square overflows, |g| > ~1.8e19 in float32: clip the gradients, or use "
                f"fused=False, which skips such updates)")

    def _check_learned_lr_untouched(self):
        """With ``"lr"`` learned, the group's ``lr`` is only its initial value: an LR scheduler (or a
        user) changing it would be silently ignored, so it is an error."""
        if "lr" not in self.learn:
            return
        for gi, group in enumerate(self.param_groups):
            initial = self._lr_at_init.setdefault(gi, float(group["lr"]))
            if float(group["lr"]) != initial:
                raise ValueError(f"param group {gi}: lr changed from {initial!r} to {float(group['lr'])!r} (an LR "
                                 f"scheduler?), but 'lr' is learned (learn={list(self.learn)}), so the group's lr is "
                                 f"only its initial value; read the learned one with coefficients()['lr'] and do not "
                                 f"schedule it")

    # ------------------------------------------------------------------ non-finite values
    def _deferred_gradient_check(self) -> Optional[List[Tensor]]:
        """On the fused path with records: the parameters with a gradient that the vjp kernels will
        *not* read (checked up front); ``None`` when every gradient is checked up front."""
        if self.nonfinite == "ignore" or not self.fused or self.backend != "functional" or self._records0 is None:
            return None
        recorded = {id(p) for rec in self._records0 for p in rec["params"]}
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None and id(p) not in recorded]

    def _gradients_finite(self, params: Optional[Sequence[Tensor]] = None) -> bool:
        """Policy for NaN/Inf gradients (``nonfinite``): one host read per step unless ``"ignore"``.
        ``params``: check only these (default: every parameter with a gradient)."""
        if self.nonfinite == "ignore":
            return True
        if params is None:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if self._reduce_group is not None:  # DTensor shards: the decision is taken over all ranks
            local = [dtensor.local(g) for g in grads]
            if self._finite_on_all_ranks(_sums(local)):
                return True
            # (every rank gets here together) a sum may have overflowed: decide elementwise
            exact = _elementwise_finite(local)
            if self._finite_on_all_ranks(torch.zeros(()) if exact else torch.full((), math.inf)):
                return True
        elif _all_finite(grads):
            return True
        if self.fused:
            self._check_parameters_finite()
        if self.nonfinite == "raise":
            bad = [(gi, i) for gi, g in enumerate(self.param_groups) for i, p in enumerate(g["params"])
                   if p.grad is not None and not bool(torch.isfinite(dtensor.local(p.grad)).all())]
            where = f"in (param group, index) {bad}" if bad else "on another rank of the process group"
            raise FloatingPointError(f"non-finite gradient {where}; "
                                     f"nonfinite='raise' (use 'skip' to skip such steps)")
        log.warning("non-finite gradient: step skipped (%d so far)", self.skipped_steps + 1)
        return False

    def _hypergradients_finite(self, d: List[Tensor]) -> bool:
        if self.nonfinite == "ignore" or all(bool(torch.isfinite(x).all()) for x in d):
            return True
        if self.nonfinite == "raise":
            bad = [k + 1 for k, x in enumerate(d) if not bool(torch.isfinite(x).all())]
            raise FloatingPointError(f"non-finite hypergradient at tower level(s) {bad}; nonfinite='raise'")
        log.warning("non-finite hypergradient: hyper-step skipped, coefficients kept (%d so far)",
                    self.skipped_hyper_steps + 1)
        return False

    # ------------------------------------------------------------------ the pure functions of the last updates
    def _model_fn(self, rec: Dict, span: Optional[Tuple[int, int]] = None, with_state: bool = False):
        """``q -> Delta`` for the bucket update recorded in ``rec`` (its inputs held fixed); with
        ``span = (start, stop)``, for those elements of the bucket only (a chunk); ``with_state``:
        ``q -> (Delta, new state)`` (for ``torch.func.vjp(..., has_aux=True)``)."""
        group = self.param_groups[rec["group"]]
        g, state, x = _chunk_of(rec, span)
        if x is None and needs_param(self.family, rec["fixed"]["weight_decay"], rec["mode"]):
            # not recorded: x enters the update additively and no learned coefficient multiplies it
            # (``_vjp_reads_x``), so a zero gives the same vjp
            x = torch.zeros((), dtype=g.dtype, device=g.device)

        def fn(q):
            h = self._model_h(group, rec["params"], q, fixed=rec["fixed"], span=span)
            delta, new_state = displacement(self.family, g, state, x, h, rec["t"], rec["mode"])
            return (delta, new_state) if with_state else delta

        return fn

    def _level_fn(self, k: int, rec: Dict):
        """``q_{k+1} -> q_k`` for the tower update of level k recorded in ``rec``."""
        lv = self.tower[k]
        lows, highs = self._bounds[k]

        def fn(q_next):
            q_new, _ = level_update(lv.family, rec["q_old"], rec["g"], rec["state"], self._level_h(k, q_next), rec["t"],
                                    lv.family.weight_decay_mode, lows, highs, self._scales[k])
            return q_new

        return fn

    def _cotangent(self, params: Sequence[Tensor], dtype) -> Tensor:
        if self._reduce_group is not None:  # DTensor parameters: the local shards of their gradients
            grads = [dtensor.local(p.grad) if p.grad is not None else torch.zeros_like(dtensor.local(p))
                     for p in params]
        else:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        return flatten(grads, copy=True).to(dtype)

    def _lagging(self) -> bool:
        """Whether a recorded bucket's buffers are left at the state *before* the recorded update, with
        the record's gradient kept beside them, until the next step advances them (the fused path, and
        the functional backend's eager path): S + 1 parameter-sized buffers instead of 2S + 1. The graph
        backend keeps the old buffers in its record and gives the bucket new ones."""
        return self.fused or self.backend == "functional"

    def _lagging_bucket(self, rec: Dict):
        """The bucket whose buffers are ``rec``'s state (the record lags), or None (a record loaded,
        copied or unpickled holds its own tensors; the bucket's are current already)."""
        bucket = self._buckets.get(tuple(map(id, rec["params"])))
        if bucket is None or any(bucket.flat[n] is not rec["state"][n] for n in self.family.state_names):
            return None
        return bucket

    def _write_advanced(self, rec: Dict, span: Tuple[int, int], new_state: Mapping[str, Tensor],
                        scalars: Dict[str, Tensor], aliases: Dict[str, Tensor]):
        """Write one chunk of the state after ``rec``'s update into its buffers, in place. A state whose
        new value is the recorded gradient (or parameter copy) itself, MADA's g_prev, is not written:
        that record becomes its buffer (``aliases``, installed by ``_finish_advance``); scalar states go
        to ``scalars``, written once after the last chunk."""
        targets, values = {}, {}
        records = {rec[k].untyped_storage().data_ptr(): rec[k] for k in ("g", "x") if rec[k] is not None}
        for n, value in new_state.items():
            buf = rec["state"][n]
            if buf.dim() != 0 and value.untyped_storage().data_ptr() in records:
                aliases[n] = records[value.untyped_storage().data_ptr()]
                continue
            targets[n], values[n] = (buf if buf.dim() == 0 else buf[span[0]:span[1]]), value
        write_state_(targets, values, scalars)

    def _finish_advance(self, rec: Dict, bucket, scalars: Mapping[str, Tensor], aliases: Mapping[str, Tensor]):
        """The advanced record's aliased and scalar states become its bucket's buffers (and the record's:
        a buffer replaced by the gradient record is freed now, not with the records after the vjp)."""
        new = {**aliases, **{n: v.clone() for n, v in scalars.items()}}
        if new:
            self._install_state(bucket, new)
            rec["state"] = {**rec["state"], **new}

    def _collect_hypergradients(self) -> List[Tensor]:
        L = len(self.tower)
        if self.backend == "graph":
            if self._graph_residual is None:  # after load_state_dict: rebuild the kept graph from the records
                self._rebuild_graph()
            if self._reduce_sharded:
                return self._graph_hypergradients_sharded()
            with torch.enable_grad():
                surrogate = sum((self._cotangent(params, delta.dtype) * delta).sum()
                                for params, delta in self._graph_residual)
                grads = torch.autograd.grad(surrogate, self._graph_leaves, allow_unused=True)
            return [torch.zeros_like(self._q[k]) if g is None else g for k, g in enumerate(grads)]
        # functional backend: the fold of vjps, each recomputing its update from the recorded inputs
        d1 = self._fused_d1() if self.fused else torch.zeros_like(self._q[0])
        shard = torch.zeros_like(d1) if self._reduce_sharded else None
        for rec in ([] if self.fused else self._records0):
            # chunk by chunk (``chunk_numel``): the recomputed update's temporaries stay chunk-sized;
            # the hypergradient is the sum of the chunks' vjps. A lagging record's buffers (those of its
            # bucket) are advanced past the recorded update here, each chunk as soon as its vjp is
            # taken: that vjp computes the new state anyway (``has_aux``), so the advance costs writes only.
            cotangent = self._cotangent(rec["params"], rec["g"].dtype)
            g_q = torch.zeros_like(self._q[0])
            bucket = self._lagging_bucket(rec)  # (None: a loaded record; its bucket is current already)
            scalars: Dict[str, Tensor] = {}
            aliases: Dict[str, Tensor] = {}
            spans = chunk_spans(rec["g"].numel(), default_chunk_numel(self.chunk_numel, rec["g"].device))
            for span in spans or [(0, 0)]:  # (empty: scalar states still advance)
                _, vjp_fn, new_state = torch.func.vjp(self._model_fn(rec, span, with_state=True), self._q[0],
                                                      has_aux=True)
                g_q = g_q + vjp_fn(cotangent[span[0]:span[1]])[0]
                if bucket is not None:  # after the vjp: its backward may read this chunk of the buffers
                    self._write_advanced(rec, span, new_state, scalars, aliases)
            if bucket is not None:
                self._finish_advance(rec, bucket, scalars, aliases)
            if shard is not None and dtensor.is_sharded(rec["params"][0]):
                shard = shard + g_q  # this rank's part of a sum over all the shards
            else:
                d1 = d1 + g_q
        if not self.fused:  # every lagging record has been advanced: the buffers hold the current state
            self._records0, self._current_cache = None, {}
        if shard is not None:  # one all-reduce per step: the sum over every element of the sharded parameters
            dist.all_reduce(shard, op=dist.ReduceOp.SUM, group=self._reduce_group)
            d1 = d1 + shard
        d = [d1]
        for k in range(1, L):
            rec = self._level_records[k - 1]
            if rec is None:  # level k has not moved yet: q_k does not depend on q_{k+1}
                d.append(torch.zeros_like(self._q[k]))
                continue
            d.append(self._level_vjp(k - 1, rec, d[k - 1]))
        return d

    def _level_vjp(self, k: int, rec: Dict, cotangent: Tensor) -> Tensor:
        """``d_{k+2} = (dq_{k+1}/dq_{k+2})^T d_{k+1}`` for tower level k's recorded update (0-based).

        The same vjp as ``torch.func.vjp(self._level_fn(k, rec), q)``, taken by ``torch.autograd.grad``
        on a graph built and freed here: on vectors of a few entries the cost is Python overhead, and
        functorch's transform machinery cost 3.3x autograd's (441 against 133 us a level, warm; on the
        10.8M-parameter GPT's fused step, where this runs between kernels that stream the caches empty,
        the level's vjp took 2.1 ms of a 61 ms step)."""
        with torch.enable_grad():
            leaf = self._q[k + 1].detach().requires_grad_(True)
            out = self._level_fn(k, rec)(leaf)
            if not out.requires_grad:  # q_{k+1} does not depend on q_{k+2} (the only leaf here)
                return torch.zeros_like(leaf)
            return torch.autograd.grad(out, leaf, cotangent)[0]

    def _graph_hypergradients_sharded(self) -> List[Tensor]:
        """Graph backend with sharded DTensor parameters: every level's hypergradient is linear in the
        model-level cotangent, so the part from the sharded parameters (a per-rank partial sum) is
        all-reduced, once for all levels, and the part from replicated ones added once."""
        leaves = self._graph_leaves
        sharded = [(ps, dl) for ps, dl in self._graph_residual if dtensor.is_sharded(ps[0])]
        rest = [(ps, dl) for ps, dl in self._graph_residual if not dtensor.is_sharded(ps[0])]

        def grads_of(items, retain):
            if not items:
                return [torch.zeros_like(q) for q in self._q]
            with torch.enable_grad():
                surrogate = sum((self._cotangent(ps, dl.dtype) * dl).sum() for ps, dl in items)
                grads = torch.autograd.grad(surrogate, leaves, allow_unused=True, retain_graph=retain)
            return [torch.zeros_like(self._q[k]) if g is None else g for k, g in enumerate(grads)]

        part = grads_of(sharded, retain=bool(rest))
        flat = torch.cat(part)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._reduce_group)
        part = list(torch.split(flat, [q.numel() for q in self._q]))
        return [a + b for a, b in zip(part, grads_of(rest, retain=False))]

    def _rebuild_graph(self):
        """Recompute the last updates in the autograd graph (same inputs, same numbers)."""
        L = len(self.tower)
        with torch.enable_grad():
            leaves = [q.detach().requires_grad_(True) for q in self._q]
            current = leaves[L - 1] if L else None
            chain: List[Optional[Tensor]] = [None] * L
            if L:
                chain[L - 1] = current
            for k in reversed(range(L - 1)):
                rec = self._level_records[k]
                chain[k] = self._level_fn(k, rec)(chain[k + 1]) if rec is not None else leaves[k]
            self._graph_leaves = [chain[k] if chain[k] is not None else leaves[k] for k in range(L)]
            self._graph_residual = [(rec["params"], self._model_fn(rec)(self._graph_leaves[0]))
                                    for rec in self._records0]

    def _clip(self, d: Tensor) -> Tensor:
        return d if self.clip_hypergrad is None else torch.clamp(d, -self.clip_hypergrad, self.clip_hypergrad)

    def _update_tower(self, d: List[Tensor]):
        L = len(self.tower)
        graph = self.backend == "graph"
        new_q: List[Optional[Tensor]] = [None] * L
        chain: List[Optional[Tensor]] = [None] * L
        for k in reversed(range(L)):  # level k+1 updates q[k] with hyperparameters from q[k+1]
            lv = self.tower[k]
            self._level_steps[k] += 1
            rec = {"q_old": self._q[k].detach(), "g": self._clip(d[k].detach()), "state": self._level_state[k],
                   "t": float(self._level_steps[k])}
            lows, highs = self._bounds[k]
            q_next = None if k == L - 1 else (chain[k + 1] if graph else new_q[k + 1])
            with torch.enable_grad() if graph else contextlib.nullcontext():
                q_new, new_state = level_update(lv.family, rec["q_old"], rec["g"], rec["state"],
                                                self._level_h(k, q_next), rec["t"], lv.family.weight_decay_mode,
                                                lows, highs, self._scales[k])
            if graph:
                chain[k] = q_new if k < L - 1 else q_new.detach().requires_grad_(True)
            self._level_records[k] = rec if k < L - 1 else None  # the top level depends on nothing learned
            new_q[k] = self._apply_perturbation(k, q_new.detach())
            self._level_state[k] = {n: v.detach() for n, v in new_state.items()}
        self._q = new_q
        if graph:
            self._graph_chain = chain

    def _apply_perturbation(self, k: int, q: Tensor) -> Tensor:
        """Finite-difference hook (``gradcheck``): shift entry ``i`` of level ``k``'s fresh vector once."""
        if self._perturbation is not None and self._perturbation[0] == k:
            _, i, amount = self._perturbation
            self._perturbation = None
            q = q.clone()
            q[i] += amount
        return q

    # ------------------------------------------------------------------ fused path
    def _hyper_kernel(self, mode: str) -> HyperKernels:
        kern = self._hyper_kernels.get(mode)
        if kern is None:
            kern = self._hyper_kernels[mode] = HyperKernels(self.family, mode, self.learn, native=self.native)
        return kern

    def _set_indices(self, p: Tensor) -> Tensor:
        """Entries of the level-1 vector holding this tensor's coefficients."""
        s = self._param_set[id(p)]
        idx = self._set_index.get(s)
        if idx is None:
            lay = self._layouts[0]
            idx = self._set_index[s] = torch.tensor([lay.index(s, n) for n in self.learn], device=self.hyper_device)
        return idx

    @staticmethod
    def _flat_view(t: Tensor) -> Tensor:
        return t.view(-1) if t.is_contiguous() else t

    def _scalars(self, values: Mapping[str, object], ref: Tensor) -> Dict[str, Tensor]:
        return {k: device_scalar(v, ref.device) for k, v in values.items()}

    def _sets_of(self, params: Sequence[Tensor]) -> List[object]:
        """The coefficient set of each parameter: small tensors share a kernel call only within one."""
        return [self._param_set[id(p)] for p in params]

    def _plan(self, params: Sequence[Tensor]) -> SegmentPlan:
        """The kernel calls of one bucket (``optimizers.compiled.SegmentPlan``), kept with the bucket
        (``_adopt_records`` has made it)."""
        return self._bucket(params).plan(self._sets_of(params))

    def _adopt_records(self):
        """On the fused path a recorded bucket's buffers *are* its record's state (the state before
        the recorded update). Records that were loaded, copied or unpickled hold their own tensors:
        they become the buckets' buffers."""
        for rec in self._records0 or []:
            bucket = self._buckets.get(tuple(map(id, rec["params"])))
            if bucket is None or any(bucket.flat[n] is not rec["state"][n] for n in self.family.state_names):
                self._bucket(rec["params"], flat=rec["state"])

    def _step_scalars(self, fixed: Mapping[str, object], params: Sequence[Tensor], t: float,
                      kern: HyperKernels) -> Dict[int, Tuple]:
        """``(h, t, precomputed)`` of a bucket update per coefficient set: the hyperparameters
        ``fixed``, the learned coefficients of that set and the scalars hoisted out of the kernels."""
        fixed = self._scalars(fixed, params[0])
        t = device_scalar(float(t), params[0].device)
        out: Dict[int, Tuple] = {}
        for p in params:
            s = self._param_set[id(p)]
            if s not in out:
                h = dict(fixed)
                # a copy (index tensor), converted once: later hyper-steps do not reach it
                q_sub = self._q[0][self._set_indices(p)].to(torch.float64)
                for j, name in enumerate(self.learn):
                    h[name] = q_sub[j]
                out[s] = (h, t, kern.scalars(h, t))
        return out

    def _record_scalars(self, rec: Dict, kern: HyperKernels) -> Dict[int, Tuple]:
        """The scalars of a recorded fused update: kept with it, or (a record loaded from a file, by
        ``load_state_dict`` before any hyper-step) recomputed with the current coefficients, which
        are the ones it used."""
        if "scalars" not in rec:
            rec["scalars"] = self._step_scalars(rec["fixed"], rec["params"], rec["t"], kern)
        return rec["scalars"]

    def _advanced_state(self, rec: Dict) -> Dict[str, Tensor]:
        """The state after a recorded update (new tensors), from the state before it."""
        if not self.fused:
            _, new = self._chunked_update(self.param_groups[rec["group"]], rec, self._q[0], None, keep_delta=False)
            return {n: v.clone() if v is rec["g"] or v is rec["x"] else v for n, v in new.items()}
        kern = self._hyper_kernel(rec["mode"])
        scalars = self._record_scalars(rec, kern)
        names, params = self.family.state_names, rec["params"]
        parts: Dict[str, List[Tensor]] = {n: [] for n in names}
        for off, n, idxs in segments(params, self._sets_of(params)):
            sl = slice(off, off + n)
            h, t, pre = scalars[self._param_set[id(params[idxs[0]])]]
            new = kern.advance(rec["g"][sl], [rec["state"][m][sl] for m in names], h, t, pre)
            for m in names:
                parts[m].append(new[m].expand(n) if new[m].dim() == 0 else new[m])
        return {m: torch.cat(v) for m, v in parts.items()}

    def _current_buffer(self, view: Tensor) -> Tensor:
        """``view`` (a parameter's slice of a bucket buffer) as the current state: itself, unless the
        buffer is a lagging record's, left at the state before the recorded update; then the same slice
        of the advanced state, computed once per record and step (``_ParamState``)."""
        if not self._lagging() or not self._records0:
            return view
        ptr = view.untyped_storage().data_ptr()
        for rec in self._records0:
            for name, buf in rec["state"].items():
                if buf.untyped_storage().data_ptr() != ptr:
                    continue
                cached = self._current_cache.get(id(rec))
                if cached is None:
                    cached = self._current_cache[id(rec)] = (rec, self._advanced_state(rec))
                new = cached[1][name]
                if buf.dim() == 0:  # a scalar state (NAdam's running product): the same tensor for every parameter
                    return new
                return new.as_strided(view.shape, view.stride(),
                                      new.storage_offset() + view.storage_offset() - buf.storage_offset())
        return view

    def _fused_d1(self) -> Tensor:
        """Level-1 hypergradient from the compiled per-segment vjp kernels. The gradients of a packed
        run of small tensors are concatenated here once and kept for this step's update kernel."""
        self._adopt_records()
        d1 = torch.zeros_like(self._q[0])
        self._gradient_sums = []
        q_of_set: Dict[object, Tensor] = {}
        sums: Dict[object, Tensor] = {}  # per coefficient set: its partial hypergradient
        learned = set(self.learn)
        calls, outputs = [], []  # (coefficient set, the vjp kernel's call / its outputs), in segment order
        for rec in self._records0:
            params = rec["params"]
            kern = self._hyper_kernel(rec["mode"])
            scalars = self._record_scalars(rec, kern)
            names, dtype, key = self.family.state_names, rec["g"].dtype, tuple(map(id, params))
            kernel_of_set: Dict[object, object] = {}  # the vjp kernel with this set's scalars bound
            plan = self._plan(params)
            plan.check(params)
            g_views, state_views = plan.views(rec["g"]), [plan.views(rec["state"][m]) for m in names]
            for i, (off, n, idxs) in enumerate(plan.segments):
                p = params[idxs[0]]
                s = self._param_set[id(p)]
                partial_fn = kernel_of_set.get(s)
                if partial_fn is None:
                    h, t, _ = scalars[s]
                    partial_fn = kernel_of_set[s] = kern.partial_for({k: v for k, v in h.items() if k not in learned}, t)
                if len(idxs) == 1 and not p.is_contiguous():  # a strided tensor: its own shape
                    cot = (p.grad if p.grad is not None else torch.zeros_like(p)).to(dtype).contiguous()
                else:
                    cot = cat_flat([params[j].grad for j in idxs], [params[j] for j in idxs], dtype)
                    if len(idxs) > 1 and all(params[j].grad is not None for j in idxs):
                        self._packed_grads[(key, off)] = cot
                q = q_of_set.get(s)
                if q is None:
                    q = q_of_set[s] = self._q[0][self._set_indices(p)]
                calls.append((s, partial_fn.prepare(g_views[i], [v[i] for v in state_views], cot, q)))
        for s, call in calls:  # back to back: the Python between kernels runs cache-cold (SegmentPlan)
            outputs.append((s, call()))
        for s, (partial, cot_sum) in outputs:
            # summed per set in segment order (each entry: the same additions as one index_add_ per
            # segment), added into d1 once per set
            partial = partial.to(d1.dtype)
            sums[s] = partial if s not in sums else sums[s] + partial
            self._gradient_sums.append(cot_sum)
        for s, total in sums.items():
            d1.index_add_(0, self._set_index[s], total)
        return d1

    def _fused_model_update(self, record: bool):
        """The fused update. Recording, it leaves each bucket's buffers at the state *before* the
        update and stores only the gradient: the next step's vjp recomputes the update from exactly
        these, and the next update advances the buffers past it in its own loop. The step thus keeps
        S + 1 parameter-sized buffers for a rule with a state that is the gradient (MADA's g_prev: the
        record and that state's buffer trade roles), else S + 2 (two records, alternating), and writes
        them in place. (The vjp of this step has made the recorded buckets' buffers their records'.)"""
        plan = []
        for gi, group in enumerate(self.param_groups):
            with_grad = [p for p in group["params"] if p.grad is not None]
            plan += [(gi, group, step, params) for (_, _, step), params in self._partition(with_grad).items()]
        lagging = {tuple(map(id, r["params"])): r for r in self._records0 or []}
        # From here on the records are consumed (advanced below or by the kernels): the buffers are
        # read as they are (``_current_buffer``) until this update's records replace them.
        self._records0, self._current_cache = None, {}
        stepping = {tuple(map(id, params)) for _, _, _, params in plan}
        for key in [k for k in lagging if k not in stepping]:  # a recorded bucket that does not step now
            rec = lagging.pop(key)
            for n, new in self._advanced_state(rec).items():
                rec["state"][n].copy_(new)
        records = []
        names = self.family.state_names
        # gradients of packed runs that this step's vjp kernels concatenated already (same bucket)
        packed, self._packed_grads = self._packed_grads, {}
        for gi, group, step, params in plan:
            mode = group["weight_decay_mode"]
            kern = self._hyper_kernel(mode)
            fixed = self._fixed_hyperparameters(group)
            bucket = self._bucket(params)
            key = tuple(map(id, params))
            last_rec = lagging.pop(key, None)
            last = None if last_rec is None else self._record_scalars(last_rec, kern)
            g_last = None if last_rec is None else last_rec["g"]
            # Recording after a recorded update, a family with a state that is the gradient (MADA's
            # g_prev) rotates: that state's buffer becomes the new record and the last record's buffer
            # that state (``hypergrad.fused._update``): S + 1 buffers. Otherwise the gradient goes to a
            # spare buffer, never the one the kernel reads as g_last: S + 2.
            rotate = kern.can_rotate(last_rec, record)
            spare = self._grad_record.setdefault(key, [])
            g_store = None
            if record and not rotate:
                g_store = next((b for b in spare if b is not g_last), None)
                if g_store is None:
                    in_use = [b for b in (*bucket.flat.values(), *spare, g_last) if b is not None and b.dim()]
                    g_store = flat_buffer(sum(p.numel() for p in params), params[0].dtype, params[0].device,
                                          free_slot(in_use, len(self.family.state_names) + 1))
                else:
                    spare.remove(g_store)
            state = dict(bucket.flat)
            now = self._step_scalars(fixed, params, float(step + 1), kern)
            grads = [p.grad for p in params]
            kernel_of_set = {s: kern.update_for(*now[s], None if last is None else last[s], record, rotate)
                             for s in now}
            plan = self._plan(params)
            plan.check(params)
            state_views = [plan.views(state[m]) for m in names]
            last_views, store_views = (None if b is None else plan.views(b) for b in (g_last, g_store))
            calls, finishes = [], []
            for i, (off, n, idxs) in enumerate(plan.segments):
                s = self._param_set[id(params[idxs[0]])]
                x, g, finish = plan.tensors(i, params, grads, packed.pop((key, off), None))
                calls.append(kernel_of_set[s].prepare(x, g, [v[i] for v in state_views],
                                                      None if last_views is None else last_views[i],
                                                      None if store_views is None else store_views[i]))
                finishes.append(finish)
            for call in calls:  # back to back: the Python between kernels runs cache-cold (SegmentPlan)
                call()
            for finish in finishes:
                finish()
            for p in params:
                self.state[p]["step"] = step + 1
            if rotate:
                g_store = state[kern.gradient_state]
                self._install_state(bucket, {kern.gradient_state: g_last})
                state = dict(bucket.flat)
            elif g_last is not None:  # consumed: kept for a later recording step
                spare.append(g_last)
            if record:
                records.append({"params": params, "group": gi, "t": float(step + 1), "mode": mode, "fixed": fixed,
                                "g": g_store, "x": None, "state": state, "scalars": now})
        self._records0 = records if record else None
        self._graph_residual = None
        for rec in records if record else ():  # their buffers lag: opt.state[p] reads the current state
            self._wrap_state(rec["params"])

    def _wrap_state(self, params: Sequence[Tensor]):
        """``opt.state[p]`` of a lagging bucket's parameters reads the current state (``_ParamState``)."""
        for p in params:
            if type(self.state[p]) is not _ParamState:
                self.state[p] = _ParamState(self.state[p], self)

    def _model_update(self, record: bool):
        if self.fused:
            return self._fused_model_update(record)
        graph = self.backend == "graph" and record
        if self._perturbation is not None and self._perturbation[0] == 0:  # the tower did not move this step
            self._q[0] = self._apply_perturbation(0, self._q[0])
        if graph:
            # this step's tower updates, in the graph; fresh leaves when the tower did not move
            chain = self._graph_chain or [q.detach().requires_grad_(True) for q in self._q]
            self._graph_leaves = chain
            q1 = chain[0]
        else:
            q1 = self._q[0]
        self._graph_chain = None
        records, graph_residual = [], []
        # The last step's records have served their vjp: let them go before this update's new buffers
        # and records are made (the graph backend's hold the old state buffers, 6 for MADA).
        self._records0, self._current_cache = None, {}
        lag = record and not graph and self._lagging()
        for gi, group in enumerate(self.param_groups):
            with_grad = [p for p in group["params"] if p.grad is not None]
            if not with_grad:
                continue
            for (_, _, step), params in self._step_partition(with_grad):
                bucket = self._bucket(params)
                xs, gs = bucket.tensors()  # the parameters, or their local shards (DTensor)
                mode = group["weight_decay_mode"]
                rec = {"params": params, "group": gi, "t": float(step + 1), "mode": mode,
                       "fixed": self._fixed_hyperparameters(group),
                       "g": _record(gs, bucket.dtype),
                       "x": (_record(xs, bucket.dtype) if needs_param(self.family, group["weight_decay"], mode)
                             and self._vjp_reads_x(mode) else None),
                       "state": dict(bucket.flat)}
                if graph:
                    with torch.enable_grad():
                        h = self._model_h(group, params, q1, fixed=rec["fixed"])
                        delta, new_state = displacement(self.family, rec["g"], rec["state"], rec["x"], h, rec["t"],
                                                        mode)
                    graph_residual.append((params, delta))
                    delta = delta.detach()
                    new_state = {n: v.detach() for n, v in new_state.items()}
                else:  # lagging: the buffers stay at the state before this update, its record's
                    delta, new_state = self._chunked_update(group, rec, q1, xs, keep_state=not lag)
                if self.nonfinite != "ignore" and not (_all_finite([delta]) if self._reduce_group is None
                                                       else self._finite_on_all_ranks(delta)):
                    if self.nonfinite == "raise":
                        raise FloatingPointError(f"non-finite update in param group {gi}; nonfinite='raise'")
                    log.warning("non-finite update in param group %d: those parameters are not moved", gi)
                    self.skipped_updates += 1
                    continue
                # in the buffers' dtype: a narrower parameter receives x + delta rounded once
                torch._foreach_add_(list(xs), unflatten_like(delta.to(bucket.dtype), xs))
                if new_state is not None:
                    self._install_state(bucket, new_state)
                for p in params:
                    self.state[p]["step"] = step + 1
                records.append(rec)
        self._records0 = records if record else None
        self._graph_residual = graph_residual if graph else None
        for rec in records if lag else ():  # their buffers lag: opt.state[p] reads the current state
            self._wrap_state(rec["params"])

    def _vjp_reads_x(self, mode: str) -> bool:
        """Whether the vjp of a recorded update reads the parameters x, so that the record keeps a copy
        of them: a learned lr multiplies the weight decay term, L2 decay puts x in the gradient the rule
        reads, a rule may read x itself, and the graph backend keeps the update itself. Otherwise
        (decoupled or proximal decay with a fixed lr) x enters the update additively, with no learned
        coefficient on it, and its vjp is the same for any x."""
        return (self.backend == "graph" or self.family.uses_param or "lr" in self.learn
                or mode not in ("decoupled", "proximal"))

    def _chunked_update(self, group: Mapping, rec: Dict, q1: Optional[Tensor], xs: Optional[Sequence[Tensor]],
                        keep_state: bool = True, keep_delta: bool = True
                        ) -> Tuple[Optional[Tensor], Optional[Dict[str, Tensor]]]:
        """``displacement`` of the recorded bucket update, chunk by chunk (``chunk_numel``) into new
        buffers: the delta and the new state (the old buffers stay as the record's); each None unless
        kept (``keep_delta``, ``keep_state``). Elementwise, so the numbers are those of one call over
        the bucket, with chunk-sized temporaries. ``xs``: the bucket's tensors, read chunk by chunk
        where the record holds no copy of x (not needed without the delta: x then enters the delta
        only). A state whose new value is the recorded gradient or parameter itself (MADA's g_prev)
        becomes that record, as in one call over the bucket: no buffer of its own."""
        delta = torch.empty_like(rec["g"]) if keep_delta else None
        new_state: Optional[Dict[str, Tensor]] = {} if keep_state else None
        scalars: Dict[str, Tensor] = {}
        read_x = rec["x"] is None and needs_param(self.family, rec["fixed"]["weight_decay"], rec["mode"])
        zero_x = None
        if read_x and not keep_delta:  # x enters additively, with no learned coefficient: the state never reads it
            read_x, zero_x = False, torch.zeros((), dtype=rec["g"].dtype, device=rec["g"].device)
        like = xs if xs is not None else [rec["g"]]
        plan = chunk_plan(like, default_chunk_numel(self.chunk_numel, rec["g"].device))
        for start, stop, pieces in plan or [(0, 0, [])]:  # (empty: scalars still advance)
            span = (start, stop)
            g, state, x = _chunk_of(rec, span)
            if read_x:
                x = gather(xs, pieces, rec["g"].dtype)
            elif zero_x is not None:
                x = zero_x
            h = self._model_h(group, rec["params"], q1, fixed=rec["fixed"], span=span)
            d, new = displacement(self.family, g, state, x, h, rec["t"], rec["mode"])
            if delta is not None:
                delta[span[0]:span[1]].copy_(d)
            if new_state is None:
                continue
            targets, values = {}, {}
            for n, value in new.items():
                if rec["state"][n].dim() != 0 and (value is g or value is x):
                    new_state[n] = rec["g"] if value is g else rec["x"]
                    continue
                if n not in new_state:
                    old = rec["state"][n]
                    new_state[n] = old if old.dim() == 0 else torch.empty_like(old)
                buf = new_state[n]
                targets[n], values[n] = (buf if buf.dim() == 0 else buf[span[0]:span[1]]), value
            write_state_(targets, values, scalars)
        for n, value in scalars.items():  # a scalar buffer: a new tensor (the old one is the record's)
            new_state[n] = value.clone()
        return delta, new_state

    def _step_partition(self, params: Sequence[Tensor]):
        """``_partition``'s buckets, with sharded DTensors apart from replicated ones: the hypergradient
        of a sharded bucket is a per-rank partial sum to all-reduce, that of a replicated one is not."""
        parts = self._partition(params).items()
        if not self._reduce_sharded:
            return parts
        out = []
        for key, ps in parts:
            sharded = [p for p in ps if dtensor.is_sharded(p)]
            rest = [p for p in ps if not dtensor.is_sharded(p)]
            out += [(key, x) for x in (sharded, rest) if x]
        return out

    def _finite_on_all_ranks(self, *tensors: Tensor) -> bool:
        """Whether ``tensors`` are finite on every rank of the DTensor process group (one all-reduce), so
        that every rank takes the same non-finite decision."""
        bad = torch.zeros((), dtype=torch.float32, device=self.hyper_device)
        for t in tensors:
            bad = torch.maximum(bad, (~torch.isfinite(t)).any().to(bad.dtype).to(bad.device))
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self._reduce_group)
        return not bool(bad)

    def _fixed_hyperparameters(self, group) -> Dict[str, object]:
        """The group's non-learned hyperparameters as used now (a scheduler may change them later)."""
        fixed = {n: group[n] for n in self.family.coefficients if n not in self.learn}
        fixed["weight_decay"] = group["weight_decay"]
        if "lr" not in self.learn:
            lr = group["lr"]
            fixed["lr"] = lr.detach().clone() if isinstance(lr, Tensor) else lr
        return fixed

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        """torch's optimizer state plus ``"hyper"``: coefficient vectors, tower buffers, counters and the
        recorded inputs of the last updates (so a resumed run learns from its next gradient exactly as an
        uninterrupted one). Tensors, numbers and strings only: loads with ``torch.load(weights_only=True)``.
        """
        # A lagging record's bucket is at the state before its last update: the state saved per
        # parameter (torch's layout) is the state after it, computed here.
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}  # torch hands out self.state's own dicts
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for rec in (self._records0 or []) if self._lagging() else []:
            for n, buf in self._advanced_state(rec).items():
                # (DTensor parameters: the buffers follow their local shards)
                views = ([buf] * len(rec["params"]) if buf.dim() == 0
                         else unflatten_like(buf, dtensor.locals_of(rec["params"])))
                for p, view in zip(rec["params"], views):
                    sd["state"][index[id(p)]][n] = view

        def pack_model(rec):
            out = {k: v for k, v in rec.items() if k not in ("params", "x", "fixed", "scalars")}  # derivable
            out["params"] = [index[id(p)] for p in rec["params"]]
            out["fixed"] = {k: (float(v) if isinstance(v, Tensor) else v) for k, v in rec["fixed"].items()}
            if rec["x"] is not None:
                out["x"] = rec["x"]
            return out

        sd["hyper"] = {
            "signature": self._signature(),
            "q": [q.detach().clone() for q in self._q],
            "level_state": [dict(s) for s in self._level_state],
            "level_steps": list(self._level_steps),
            "hyper_step": self._hyper_step,
            "hypergrads": [d for d in self._hypergrads if d is not None] if all(d is not None for d in self._hypergrads) else [],
            "skipped_steps": self.skipped_steps,
            "skipped_hyper_steps": self.skipped_hyper_steps,
            "skipped_updates": self.skipped_updates,
            "records0": None if self._records0 is None else [pack_model(r) for r in self._records0],
            "level_records": [r if r is None else dict(r) for r in self._level_records],
        }
        return sd

    def _signature(self) -> Dict[str, object]:
        return {"family": self.family.name, "learn": list(self.learn), "share": self.share,
                "sizes": [len(q) for q in self._q],
                "tower": [[lv.family.name, list(lv.learn)] for lv in self.tower]}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        hyper = state_dict.pop("hyper", None)
        if hyper is None:
            raise ValueError("state_dict has no 'hyper' entry: it was not saved by a HyperOptimizer")
        if hyper.get("signature") != self._signature():
            raise ValueError(f"state_dict belongs to a different hyper-optimizer: saved {hyper.get('signature')}, "
                             f"this one is {self._signature()} (family, learned coefficients, sharing and tower must match)")
        for k, (q_saved, q_now) in enumerate(zip(hyper["q"], self._q)):
            if q_saved.shape != q_now.shape:
                raise ValueError(f"state_dict coefficient vector {k} has shape {tuple(q_saved.shape)}, "
                                 f"expected {tuple(q_now.shape)}")
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        dtype, device = self.hyper_dtype, self.hyper_device
        self._q = [q.detach().to(dtype=dtype, device=device).clone() for q in hyper["q"]]
        self._level_state = [{n: v.detach().to(device).clone() for n, v in s.items()} for s in hyper["level_state"]]
        self._level_steps = [int(x) for x in hyper["level_steps"]]
        self._hyper_step = int(hyper["hyper_step"])
        self._hypergrads = ([d.detach().clone() for d in hyper["hypergrads"]] if hyper["hypergrads"]
                            else [None] * len(self.tower))
        self.skipped_steps = int(hyper["skipped_steps"])
        self.skipped_hyper_steps = int(hyper["skipped_hyper_steps"])
        self.skipped_updates = int(hyper["skipped_updates"])
        if hyper["records0"] is None:
            self._records0 = None
        else:
            records = []
            for rec in hyper["records0"]:
                ps = [params[i] for i in rec["params"]]
                records.append({"params": ps, "group": int(rec["group"]), "t": float(rec["t"]), "mode": rec["mode"],
                                "fixed": dict(rec["fixed"]),
                                "g": _staggered_copy(rec["g"].to(ps[0].device), len(self.family.state_names) + 1),
                                "x": rec["x"].detach().clone() if "x" in rec else None,
                                "state": {n: _staggered_copy(rec["state"][n], slot)
                                          for slot, n in enumerate(self.family.state_names, start=1)}})
            if self.fused:  # the scalars the recorded updates used: the saved coefficients are theirs, now
                for rec in records:
                    self._record_scalars(rec, self._hyper_kernel(rec["mode"]))
            self._records0 = records
        self._level_records = [None if r is None else {"q_old": r["q_old"].detach().clone(), "g": r["g"].detach().clone(),
                                                       "state": {n: v.detach().clone() for n, v in r["state"].items()},
                                                       "t": float(r["t"])}
                               for r in hyper["level_records"]]
        self._graph_residual = None
        self._graph_chain = None
        self._current_cache = {}  # (advanced copies of the replaced records)

    def __repr__(self):
        return (f"HyperOptimizer({self.family.name}, learn={list(self.learn)}, tower={self.tower}, "
                f"share={self.share!r}, backend={self.backend!r})")


class _ParamState(dict):
    """``opt.state[p]`` of a parameter in a recorded bucket whose buffers lag (``HyperOptimizer._lagging``).

    There the bucket's buffers hold the state *before* the last update (the next vjp recomputes that
    update from them; the next update advances them on the fused path, ``hypergrad/fused.py``, and
    the vjp itself on the eager path). Read through this
    mapping (``[]``, ``get``, ``items``, ``values``), a buffer is the current state, as in
    ``state_dict()`` and on the other paths: computed from those buffers on first access after a step
    (``HyperOptimizer._current_buffer``), a new tensor, so writing into it does not change the
    optimizer. Entries that are current already (any other path, a bucket not recorded) come back as
    stored. Pickled or copied, it becomes a plain dict of the current values."""

    __slots__ = ("_owner",)

    def __init__(self, data: Mapping, owner: "HyperOptimizer"):
        super().__init__(data)
        self._owner = weakref.ref(owner)

    def __getitem__(self, key):
        value = dict.__getitem__(self, key)
        owner = self._owner()
        return owner._current_buffer(value) if owner is not None and isinstance(value, Tensor) else value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def items(self):
        return [(k, self[k]) for k in self]

    def values(self):
        return [self[k] for k in self]

    def copy(self):
        return dict(self.items())

    def __reduce__(self):
        return dict, (dict(self.items()),)


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, with one host read in the usual case.

    A NaN or Inf anywhere makes a tensor's sum non-finite, and a sum reads each tensor once and
    writes nothing tensor-sized (``isfinite()`` would write a bool tensor per tensor). The sums
    accumulate in float32 (float64 for float64 tensors): in float64 each element's conversion made
    the check cost more than a whole fused AdamW step (34 ms against 15 on the 10.7M-parameter char
    GPT). A sum that overflows although every element is finite (gradients near 1e38 / numel) is
    told apart by checking those tensors elementwise, so nothing finite is reported otherwise."""
    if not tensors:
        return True
    finite = torch.isfinite(_sums(tensors))
    if bool(finite.all()):
        return True
    return _elementwise_finite([t for t, ok in zip(tensors, finite.tolist()) if not ok])


def _elementwise_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, element by element (one host read per tensor):
    the exact check behind a non-finite sum."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _sums(tensors: Sequence[Tensor]) -> Tensor:
    """The sum of each tensor (float32 accumulation, float64 for float64), stacked as float64."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([t.sum(dtype=torch.promote_types(t.dtype, torch.float32)).to(torch.float64) for t in tensors])


def _chunk_of(rec: Dict, span: Optional[Tuple[int, int]]):
    """``(g, state, x)`` of a record, or their slices ``[start, stop)`` (scalar buffers whole)."""
    if span is None:
        return rec["g"], rec["state"], rec["x"]
    sl = slice(*span)
    return rec["g"][sl], state_slice(rec["state"], *span), (None if rec["x"] is None else rec["x"][sl])


def _staggered_copy(t: Tensor, slot: int) -> Tensor:
    """A copy of a loaded flat buffer, placed as the bucket's own buffers are (``flat_buffer``): on the
    fused path a record's buffers become its bucket's."""
    t = t.detach()
    if t.dim() != 1:
        return t.clone()
    return flat_buffer(t.numel(), t.dtype, t.device, slot).copy_(t)


def _record(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """A flat copy of ``tensors`` in ``dtype`` (the buffers' dtype) for the record of an update."""
    return flatten(tensors, copy=True) if tensors[0].dtype == dtype else flatten(tensors).to(dtype)


# ---------------------------------------------------------------------------------- conveniences
def MADA(params, lr: float = 1e-3, weight_decay: float = 0.0, **kwargs) -> HyperOptimizer:
    """MADA as a drop-in optimizer: ``hypergrad.MADA(model.parameters(), lr=3e-4)``.

    Learns (beta1, beta2, beta3, c, rho, gamma) by default, with ``Level("adam", lr=1e-3)``.
    """
    return HyperOptimizer(params, get_rule("mada"), lr=lr, weight_decay=weight_decay, **kwargs)


def HyperAdam(params, lr: float = 1e-3, weight_decay: float = 0.0, **kwargs) -> HyperOptimizer:
    """The paper's HyperAdam baseline: MADA at the Adam vertex with only beta1, beta2 learned."""
    kwargs.setdefault("learn", ("beta1", "beta2"))
    return HyperOptimizer(params, get_rule("mada").vertex("adam"), lr=lr, weight_decay=weight_decay, **kwargs)


def HyperSGD(params, lr: float = 1e-2, hyper_lr: float = 1e-4, momentum: float = 0.0, **kwargs) -> HyperOptimizer:
    """Baydin et al. (2018) SGD-HD: SGD whose learning rate is learned, ``dF_t/dlr = -g_t . g_{t-1}``."""
    family = get_rule("sgd")
    if momentum == 0:
        family = family.vertex("plain")
    else:
        kwargs["momentum"] = momentum
    kwargs.setdefault("learn", ("lr",))
    kwargs.setdefault("tower", Level("sgd", lr=hyper_lr))
    return HyperOptimizer(params, family, lr=lr, **kwargs)
