"""``RuleOptimizer``: any ``Family`` as a ``torch.optim.Optimizer``, over a flat-buffer functional core.

Why flat buffers: a rule is ~10-40 elementwise operations. Run per parameter tensor, that is a
Python loop of many small kernels (what the reference MADA code does, 6.5x slower than Adam).
Here the parameters of a param group that share dtype, device and step count form a *bucket*:
their optimizer buffers live in one contiguous tensor per buffer name, and the rule runs on
chunks of ``chunk_numel`` elements of the bucket (``functional.apply_update``): per chunk the
gradients are gathered with one ``torch.cat``, the buffers' slices are written in place, and the
update is scattered back with one ``torch._foreach_add_``. Chunks keep the rule's temporaries in
cache instead of allocating parameter-sized ones.

``optimizer.state[p]`` keeps the torch layout (``{"step": int, "exp_avg": tensor, ...}``), where
each tensor is a view into its bucket, so ``state_dict`` / ``load_state_dict`` interoperate with
the usual tooling. A bucket is rebuilt (one copy) only when the set of parameters that step
together changes, e.g. when some parameters receive no gradient.

With ``fused=True`` the same buffers are updated in place by one compiled kernel per tensor
(``fused.py``), which reads and writes each buffer once.

``state_dtype`` keeps the buffers in another dtype than the parameters, typically wider (float32
state for bfloat16 parameters): the gradient is upcast, the update computed in ``state_dtype``, and the parameter
receives ``x + delta`` rounded once to its own dtype.

DTensor parameters (FSDP2) are updated shard by shard (``dtensor.py``): the rules are elementwise,
so each rank runs them on ``p.to_local()`` with buffers sized by the local number of elements, and
``state[p]`` holds that rank's shards of the buffers.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import dtensor
from .family import WEIGHT_DECAY_MODES, Family
from .functional import apply_update, displacement, flat_buffer, flatten, needs_param, unflatten_like
from .compiled import SegmentPlan
from .fused import FusedKernel
from .rules import get_rule

__all__ = ["RuleOptimizer", "build_optimizer", "apply_update", "displacement", "needs_param", "flatten",
           "unflatten_like"]


STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_state_dtype(state_dtype):
    """``state_dtype``: None (each parameter's own dtype) or a floating dtype for the optimizer buffers."""
    if state_dtype is not None and (not isinstance(state_dtype, torch.dtype) or state_dtype not in STATE_DTYPES):
        raise ValueError(f"state_dtype must be None (the parameters' dtype) or a floating torch.dtype, one of "
                         f"{[str(d) for d in STATE_DTYPES]}; got {state_dtype!r}")


class _Bucket:
    """Parameters that step together, their flat buffers, and (DTensor parameters) whether to use shards.

    ``like`` are the tensors whose shapes the flat buffers follow: the parameters themselves, or
    their local shards when ``dtensor``; ``dtype`` is the dtype of the buffers and of the update.
    """
    __slots__ = ("params", "flat", "dtensor", "like", "dtype", "plans")

    def __init__(self, params: List[Tensor], flat: Dict[str, Tensor], dtensor: bool, like: List[Tensor],
                 dtype: torch.dtype):
        self.params = params
        self.flat = flat
        self.dtensor = dtensor
        self.like = like
        self.dtype = dtype
        self.plans: Dict[object, SegmentPlan] = {}  # the fused kernels' calls, by grouping of the params

    def plan(self, groups: Optional[Sequence[Hashable]] = None) -> SegmentPlan:
        """The ``SegmentPlan`` of the fused kernels over this bucket (``groups``: which tensors may share a
        packed call, e.g. by coefficient set), kept with the bucket."""
        key = None if groups is None else tuple(groups)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = SegmentPlan(self.like, groups)
        return plan

    def tensors(self) -> Tuple[List[Tensor], List[Tensor]]:
        """The tensors to update and their gradients: the parameters, or fresh views of their local shards."""
        if not self.dtensor:
            return self.params, [p.grad for p in self.params]
        return dtensor.locals_of(self.params), [dtensor.local(p.grad) for p in self.params]


def expand_betas(values: Mapping[str, object], where: str) -> Dict[str, object]:
    """``values`` with torch's ``betas=(beta1, beta2)`` spelled as ``beta1``/``beta2`` (an explicit
    ``beta1``/``beta2`` wins); ``where`` names the argument in the error for a malformed pair."""
    values = dict(values)
    if "betas" in values:
        betas = values.pop("betas")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where} must be a pair (beta1, beta2), got {betas!r}")
        values.setdefault("beta1", betas[0])
        values.setdefault("beta2", betas[1])
    return values


def _check_number(name: str, value, low: float = 0.0, allow_tensor: bool = True):
    if isinstance(value, Tensor) and allow_tensor:
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a 1-element floating tensor, got {value!r}")
        v = float(value.detach())
    elif isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    else:
        v = float(value)
    if not (v >= low) or math.isnan(v) or math.isinf(v):
        raise ValueError(f"{name} must be a finite number >= {low}, got {v!r}")


class RuleOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` running ``family`` with fixed coefficients.

    Args:
        params: iterable of tensors or param-group dicts (as for any torch optimizer).
        family: a ``Family`` (``optimizers.adam()``, ``optimizers.mada().vertex("yogi")``...) or a
            registered name (``"adamw"``).
        lr: learning rate (>= 0; a float or a 0-D tensor, LR schedulers work as usual).
        weight_decay: >= 0.
        weight_decay_mode: ``"decoupled"`` / ``"l2"`` / ``"proximal"``; default: the family's.
        fused: run each step as one compiled in-place kernel per parameter tensor (``fused.py``;
            Inductor compiles on the first step). Same numbers as the default flat path
            (checked in float64), several times faster on large models.
        state_dtype: dtype of the optimizer buffers and of the update arithmetic (default None: each
            parameter's own dtype). ``torch.float32`` for bfloat16 parameters keeps float32 buffers,
            upcasts the gradient, computes the update in float32 and rounds ``x + delta`` once to the
            parameter's dtype. ``state_dict`` keeps the buffers in this dtype.
        **coefficients: values of the family's coefficients (``beta1=0.9``...); ``betas=(b1, b2)``
            is accepted for families with ``beta1``/``beta2``. Each must lie in its domain.

    Attribute ``chunk_numel``: elements per chunk of the non-fused update, which bounds its
    temporaries; any value gives the same numbers. ``None`` (default): ``functional.CHUNK_NUMEL``
    (2**18) on a CPU, one chunk per bucket on other devices.
    """

    chunk_numel: Optional[int] = None

    def __init__(self, params, family, lr: float = 1e-3, weight_decay: float = 0.0,
                 weight_decay_mode: Optional[str] = None, fused: bool = False,
                 state_dtype: Optional[torch.dtype] = None, **coefficients):
        if isinstance(family, str):
            family = get_rule(family)
        if not isinstance(family, Family):
            raise TypeError(f"family must be a Family or a registered rule name, got {type(family).__name__}")
        self.family = family
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be True or False, got {fused!r}")
        self.fused = fused
        check_state_dtype(state_dtype)
        self.state_dtype = state_dtype
        self._kernels: Dict[str, FusedKernel] = {}
        self._has_dtensor = False  # any DTensor parameter (FSDP2): checked per step, updated by shard
        if "betas" in coefficients and ("beta1" not in family.coefficients or "beta2" not in family.coefficients):
            raise ValueError(f"betas given but family {family.name!r} has no beta1/beta2; "
                             f"coefficients: {sorted(family.coefficients)}")
        coefficients = expand_betas(coefficients, "betas")
        unknown = set(coefficients) - set(family.coefficients)
        if unknown:
            raise ValueError(f"unknown argument(s) {sorted(unknown)} for family {family.name!r}; "
                             f"its coefficients are {sorted(family.coefficients)}")
        defaults = dict(lr=lr, weight_decay=weight_decay,
                        weight_decay_mode=family.weight_decay_mode if weight_decay_mode is None else weight_decay_mode)
        defaults.update(family.defaults())
        defaults.update(coefficients)
        self._validate_group(defaults, "defaults")
        self._buckets: Dict[Tuple[int, ...], _Bucket] = {}
        self._param_bucket: Dict[int, Tuple[int, ...]] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ copy / pickle
    # torch.optim.Optimizer pickles only defaults/state/param_groups; keep everything of ours,
    # minus what is tied to object identity (buckets keyed by id(param)) or to compiled code.
    _UNPICKLED = ("_buckets", "_param_bucket", "_kernels")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._UNPICKLED}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("state_dtype", None)  # pickled before these options existed
        self.__dict__.setdefault("_has_dtensor", False)
        super().__setstate__(state)
        # buckets are rebuilt (one copy) from the per-parameter state views on the next step
        self._buckets, self._param_bucket, self._kernels = {}, {}, {}

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: Mapping, where: str):
        _check_number(f"lr ({where})", group["lr"])
        _check_number(f"weight_decay ({where})", group["weight_decay"])
        mode = group["weight_decay_mode"]
        if mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode ({where}) must be one of {WEIGHT_DECAY_MODES}, got {mode!r}")
        for name, coef in self.family.coefficients.items():
            coef.validate(group[name], what=f"{name} ({where})")

    def _checked_keys(self) -> Tuple[str, ...]:
        """The group entries ``_validate_group`` reads."""
        return ("lr", "weight_decay", "weight_decay_mode", *self.family.coefficients)

    def add_param_group(self, param_group):
        if isinstance(param_group, dict):
            unknown = set(param_group) - {"params", "lr", "weight_decay", "weight_decay_mode", "betas", "name",
                                          "initial_lr", *self.family.coefficients}
            if unknown:
                raise ValueError(f"unknown param-group key(s) {sorted(unknown)} for family {self.family.name!r}")
            param_group = expand_betas(param_group, "betas in a param group")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for i, p in enumerate(group["params"]):
            if not p.is_floating_point():
                raise TypeError(f"parameter {i} of param group {len(self.param_groups) - 1} has dtype {p.dtype}; "
                                f"only floating-point parameters can be optimized")
            if dtensor.is_dtensor(p):
                dtensor.check_param(p, f"parameter {i} of param group {len(self.param_groups) - 1}")
                self._has_dtensor = True
        self._validate_group(group, f"param group {len(self.param_groups) - 1}")

    def _validate_all_groups(self):
        """Check every group before touching any parameter: a rejected step moves nothing. A group
        whose hyperparameters are the plain numbers (immutable) it had when last checked is not
        checked again (a dozen domain checks per group and step, ~0.1-0.3 ms with cold caches)."""
        checked = self.__dict__.setdefault("_checked_groups", {})
        for gi, group in enumerate(self.param_groups):
            values = tuple(group[k] for k in self._checked_keys())
            plain = all(type(v) in (float, int, str) for v in values)
            last = checked.get(id(group))
            if not plain or last is None or last[0] is not group or last[1] != values:
                self._validate_group(group, f"param group {gi}")
                if plain:  # (the group itself is kept: its id is not reused while it is referenced)
                    checked[id(group)] = (group, values)
            for i, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    raise ValueError(f"parameter {i} of param group {gi} has a sparse gradient; "
                                     f"{self.family.name!r} supports dense gradients only")
                if self._has_dtensor and p.grad is not None and dtensor.is_dtensor(p):
                    dtensor.check_grad(p, f"parameter {i} of param group {gi}")

    # ------------------------------------------------------------------ buckets
    def _bucket(self, params: List[Tensor], flat: Optional[Dict[str, Tensor]] = None) -> _Bucket:
        """The bucket of ``params`` (created from their per-parameter state on first use), or with
        ``flat`` a bucket made of exactly these buffers (adopted, not copied)."""
        key = tuple(map(id, params))
        bucket = self._buckets.get(key)
        if bucket is not None and flat is None:
            return bucket
        fam = self.family
        is_dt = self._has_dtensor and any(dtensor.is_dtensor(p) for p in params)
        shapes = dtensor.locals_of(params) if is_dt else params  # buffers follow the local shards
        dtype, device = self.state_dtype or params[0].dtype, shapes[0].device
        adopted = flat is not None
        flat = dict(flat) if adopted else {}
        have_state = all(s.name in self.state[p] for p in params for s in fam.states)
        numel = sum(p.numel() for p in shapes)
        for slot, s in enumerate([] if adopted else fam.states, start=1):  # (slots: flat_buffer)
            if s.scalar:
                value = self.state[params[0]][s.name] if have_state else None
                flat[s.name] = (value.detach().clone().to(device=device, dtype=dtype) if value is not None
                                else torch.full((), s.init, dtype=dtype, device=device))
            elif have_state:
                flat[s.name] = flat_buffer(numel, dtype, device, slot)
                torch.cat([self.state[p][s.name].detach().reshape(-1).to(device=device, dtype=dtype) for p in params],
                          out=flat[s.name])
            else:
                flat[s.name] = flat_buffer(numel, dtype, device, slot, fill=s.init)
        # Re-point each parameter's state at views of the new flat buffers; buckets that shared any
        # of these parameters are retired (their other members are re-bucketed when they step).
        for p in params:
            old = self._param_bucket.get(id(p))
            if old is not None:
                self._buckets.pop(old, None)
            self._param_bucket[id(p)] = key
        for name, buf in flat.items():
            views = [buf] * len(params) if buf.dim() == 0 else unflatten_like(buf, shapes)
            for p, v in zip(params, views):
                self.state[p][name] = v
        bucket = _Bucket(params, flat, is_dt, shapes, dtype)
        self._buckets[key] = bucket
        return bucket

    def _install_state(self, bucket: _Bucket, new_state: Mapping[str, Tensor]):
        """Make ``new_state`` the bucket's buffers (no copy) and re-point each parameter's views.

        Swapping instead of copying saves a read and a write per buffer, and leaves the previous
        buffers intact for anything that still holds them (the hyper-gradient engine's residuals).
        """
        for name, value in new_state.items():
            if value.shape != bucket.flat[name].shape:  # a buffer whose rule evaluated to a scalar
                value = value.expand(bucket.flat[name].shape).clone()
            bucket.flat[name] = value
            views = [value] * len(bucket.params) if value.dim() == 0 else unflatten_like(value, bucket.like)
            for p, v in zip(bucket.params, views):
                self.state[p][name] = v

    def _retire_buckets(self):
        self._buckets.clear()
        self._param_bucket.clear()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.state_dtype is not None:
            self._restore_state_dtype(state_dict)
        self._retire_buckets()
        # Copy loaded buffers into fresh buckets now so nothing aliases the source dict's tensors.
        for group in self.param_groups:
            self._validate_group(group, "loaded state_dict")
            for params in self._partition([p for p in group["params"] if self.state.get(p)]).values():
                self._bucket(params)

    def _restore_state_dtype(self, state_dict):
        """torch's ``load_state_dict`` casts every floating buffer to its parameter's dtype; with a
        ``state_dtype`` the saved buffers (already in it) are taken again, uncast."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for i, entry in state_dict["state"].items():
            p = by_id.get(i)
            if p is None:
                continue
            device = dtensor.local(p).device
            for name, value in entry.items():
                if name != "step" and isinstance(value, Tensor) and value.is_floating_point():
                    self.state[p][name] = value.detach().to(device=device, dtype=self.state_dtype)

    def _partition(self, params: Iterable[Tensor]) -> Dict[tuple, List[Tensor]]:
        parts: Dict[tuple, List[Tensor]] = {}
        for p in params:
            key = (p.device, p.dtype, int(self.state[p].get("step", 0)) if p in self.state else 0)
            parts.setdefault(key, []).append(p)
        return parts

    # ------------------------------------------------------------------ step
    def _hyperparameters(self, group) -> Dict[str, object]:
        return {name: group[name] for name in self.family.coefficients}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._validate_all_groups()
        for gi, group in enumerate(self.param_groups):
            with_grad = [p for p in group["params"] if p.grad is not None]
            if not with_grad:
                continue
            h = self._hyperparameters(group)
            for (_, _, step), params in self._partition(with_grad).items():
                bucket = self._bucket(params)
                xs, gs = bucket.tensors()  # the parameters, or their local shards (DTensor)
                t = float(step + 1)
                if self.fused:
                    mode = group["weight_decay_mode"]
                    kernel = self._kernels.get(mode)
                    if kernel is None:
                        kernel = self._kernels[mode] = FusedKernel(self.family, mode)
                    kernel(xs, gs, bucket.flat, {**h, "lr": group["lr"], "weight_decay": group["weight_decay"]}, t,
                           bucket.dtype, bucket.plan())
                else:
                    apply_update(self.family, xs, gs, bucket.flat, h, group["lr"], group["weight_decay"],
                                 group["weight_decay_mode"], t, dtype=bucket.dtype, chunk_numel=self.chunk_numel)
                for p in params:
                    self.state[p]["step"] = step + 1
        return loss

    def __repr__(self):
        return f"RuleOptimizer({self.family.name}, groups={len(self.param_groups)})"


def build_optimizer(name: str, params, **kwargs) -> RuleOptimizer:
    """``build_optimizer("adamw", model.parameters(), lr=1e-3, betas=(0.9, 0.95))``.

    ``sgd`` with ``nesterov=True`` selects the Nesterov rule; ``momentum=0`` (the default) prunes the
    momentum buffer, as plain SGD.
    """
    family = get_rule(name)
    if name in ("sgd", "sgd_nesterov"):
        nesterov = kwargs.pop("nesterov", name == "sgd_nesterov")
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be True or False, got {nesterov!r}")
        family = get_rule("sgd_nesterov" if nesterov else "sgd")
        if not nesterov and kwargs.get("momentum", 0.0) == 0.0 and kwargs.get("dampening", 0.0) == 0.0:
            kwargs.pop("momentum", None)
            kwargs.pop("dampening", None)
            family = family.vertex("plain")
    return RuleOptimizer(params, family, **kwargs)
