"""``HyperOptimizer``: a family that learns its own coefficients while the model trains.

The one-step hypergradient (Baydin et al. 2018; gdtuo; MADA Algorithm 1). At step t the model
moved by ``x_{t-1} = x_{t-2} + Delta(q; g_{t-1}, state_{t-2}, x_{t-2})``. Holding everything but the
coefficients q fixed,

    dF_t/dq = g_t^T dDelta/dq  = vjp of the last update, evaluated at the new gradient g_t.

That vjp is taken by ``torch.func.vjp`` of the *pure* update ``optimizers.displacement`` with
respect to the coefficient vector; its residual (the saved tensors of one update, not of the
model) is kept until the next step supplies g_t. For a tower the cotangent climbs one level per
step, ``d_1 = vjp_0(g_t)``, ``d_{k+1} = vjp_k(d_k)``; the updates then run top-down, each level using
the freshly updated hyperparameters of the level above (design.md §2.3).

Two backends give the same numbers:

* ``"functional"`` (default): the fold of ``torch.func.vjp`` closures above;
* ``"graph"`` (gdtuo-style): each level's last update is kept in the autograd graph and one
  ``torch.autograd.grad`` call returns every level's hypergradient.

The user's loop is the ordinary ``zero_grad(); loss.backward(); step()``; no
``create_graph=True`` is needed.
"""
from __future__ import annotations

import logging
import math
from numbers import Real
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from optimizers import Family, Interval, Positive, get_rule
from optimizers.adapter import RuleOptimizer, displacement, flatten, needs_param, unflatten_like

from .tower import LR_COEFFICIENT, CoefficientLayout, Level, level_update

__all__ = ["HyperOptimizer", "MADA", "HyperAdam", "HyperSGD", "SHARING", "BACKENDS"]

log = logging.getLogger(__name__)

SHARING = ("global", "group", "tensor")
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
        clip_hypergrad: if given, each hypergradient entry is clamped to ``[-clip, clip]`` before it
            drives a hyper-step.
        backend: ``"functional"`` or ``"graph"`` (see module docstring).
        hyper_dtype: dtype of the coefficient vectors (default float64 if any parameter is float64,
            else float32).
        **coefficients: initial values of the family's coefficients.
    """

    def __init__(self, params, family: Union[str, Family], lr: float = 1e-3, weight_decay: float = 0.0,
                 weight_decay_mode: Optional[str] = None, *, learn: Optional[Sequence[str]] = None,
                 tower: Union[Level, Sequence[Level], None] = None, share: str = "global", warmup: int = 0,
                 clip_hypergrad: Optional[float] = None, backend: str = "functional",
                 hyper_dtype: Optional[torch.dtype] = None, **coefficients):
        super().__init__(params, family, lr=lr, weight_decay=weight_decay, weight_decay_mode=weight_decay_mode,
                         **coefficients)
        fam = self.family
        if share not in SHARING:
            raise ValueError(f"share must be one of {SHARING}, got {share!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        if clip_hypergrad is not None and (isinstance(clip_hypergrad, bool) or not isinstance(clip_hypergrad, Real)
                                           or not clip_hypergrad > 0 or math.isinf(clip_hypergrad)):
            raise ValueError(f"clip_hypergrad must be a finite number > 0 or None, got {clip_hypergrad!r}")
        learn = fam.learnable if learn is None else ((learn,) if isinstance(learn, str) else tuple(learn))
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
        self.learn = tuple(dict.fromkeys(learn))
        self.tower: List[Level] = tower
        self.share = share
        self.warmup = warmup
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
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                self._param_set[id(p)] = 0 if share == "global" else gi if share == "group" else len(self._param_set)
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
        self._residual0: Optional[list] = None  # [(params, vjp_fn or delta)] of the last model update
        self._residuals: List[Optional[object]] = [None] * len(tower)  # level k's last update (k = 1..L-1)
        self._hypergrads: List[Optional[Tensor]] = [None] * len(tower)
        self._index_cache: Dict[Tuple[int, ...], Tensor] = {}
        self._graph_q: Optional[List[Tensor]] = None  # graph backend: this step's level vectors, in the graph
        self._perturbation: Optional[Tuple[int, int, float]] = None  # (level index, entry, amount): gradcheck only

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
    def _model_h(self, group: Mapping, params: Sequence[Tensor], q1: Optional[Tensor]) -> Dict[str, object]:
        """Level-0 hyperparameters of a bucket: learned ones read from ``q1``, the rest from the group."""
        h: Dict[str, object] = {n: group[n] for n in self.family.coefficients if n not in self.learn}
        h["weight_decay"] = group["weight_decay"]
        if "lr" not in self.learn:
            h["lr"] = group["lr"]
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
        # share="tensor" with several tensors in the bucket: expand per element.
        key = tuple(map(id, params))
        counts = self._index_cache.get(key)
        if counts is None:
            counts = torch.tensor([p.numel() for p in params], device=q1.device)
            self._index_cache[key] = counts
        for n in self.learn:
            idx = torch.tensor([lay.index(s, n) for s in sets], device=q1.device)
            h[n] = torch.repeat_interleave(q1[idx], counts)
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
        self._hyper_step += 1
        # 1. Hypergradients of the last updates at the new gradient, then 2. the tower top-down.
        if self._residual0 is not None:
            d = self._collect_hypergradients()
            self._graph_q = None
            self._hypergrads = [x.detach() for x in d]
            self._update_tower(d)
        # 3. The model update with the current coefficients, recording its residual when the next
        #    step will learn from it.
        record = self._hyper_step >= self.warmup
        self._model_update(record)
        return loss

    def _cotangent(self, params: Sequence[Tensor]) -> Tensor:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        return flatten(grads, copy=True)

    def _collect_hypergradients(self) -> List[Tensor]:
        L = len(self.tower)
        if self.backend == "functional":
            d1 = torch.zeros_like(self._q[0])
            for params, vjp_fn in self._residual0:
                (g_q,) = vjp_fn(self._cotangent(params).to(self._residual_dtype(params)))
                d1 = d1 + g_q
            d = [d1]
            for k in range(1, L):
                if self._residuals[k] is None:  # level k has not moved yet: q_k does not depend on q_{k+1}
                    d.append(torch.zeros_like(self._q[k]))
                else:
                    (g_q,) = self._residuals[k](d[k - 1])
                    d.append(g_q)
            return d
        # graph backend: one backward through every level's last update
        with torch.enable_grad():
            surrogate = sum((self._cotangent(params).to(delta.dtype) * delta).sum() for params, delta in self._residual0)
            inputs = [self._graph_q[k] for k in range(L)]
            grads = torch.autograd.grad(surrogate, inputs, allow_unused=True)
        return [torch.zeros_like(self._q[k]) if g is None else g for k, g in enumerate(grads)]

    @staticmethod
    def _residual_dtype(params):
        return params[0].dtype

    def _clip(self, d: Tensor) -> Tensor:
        return d if self.clip_hypergrad is None else torch.clamp(d, -self.clip_hypergrad, self.clip_hypergrad)

    def _update_tower(self, d: List[Tensor]):
        L = len(self.tower)
        graph = self.backend == "graph"
        new_q: List[Optional[Tensor]] = [None] * L
        graph_q: List[Optional[Tensor]] = [None] * L
        for k in reversed(range(L)):  # level k+1 updates q[k] with hyperparameters from q[k+1]
            lv = self.tower[k]
            self._level_steps[k] += 1
            t = float(self._level_steps[k])
            lows, highs = self._bounds[k]
            g = self._clip(d[k].detach())
            q_old = self._q[k].detach()
            state = self._level_state[k]

            def fn(q_next, k=k, lv=lv, g=g, q_old=q_old, state=state, t=t, lows=lows, highs=highs):
                return level_update(lv.family, q_old, g, state, self._level_h(k, q_next), t, lv.family.weight_decay_mode,
                                    lows, highs, self._scales[k])

            if k == L - 1:  # top level: fixed hyperparameters
                q_new, new_state = fn(None)
                if graph:
                    graph_q[k] = q_new.detach().requires_grad_(True)
            elif graph:
                with torch.enable_grad():
                    q_new, new_state = fn(graph_q[k + 1])
                graph_q[k] = q_new
                new_state = {n: v.detach() for n, v in new_state.items()}
            else:
                q_new, vjp_fn, new_state = torch.func.vjp(fn, new_q[k + 1], has_aux=True)
                self._residuals[k + 1] = vjp_fn
            new_q[k] = self._apply_perturbation(k, q_new.detach())
            self._level_state[k] = new_state
        self._q = new_q
        if graph:
            self._graph_q = graph_q

    def _apply_perturbation(self, k: int, q: Tensor) -> Tensor:
        """Finite-difference hook (``gradcheck``): shift entry ``i`` of level ``k``'s fresh vector once."""
        if self._perturbation is not None and self._perturbation[0] == k:
            _, i, amount = self._perturbation
            self._perturbation = None
            q = q.clone()
            q[i] += amount
        return q

    def _model_update(self, record: bool):
        graph = self.backend == "graph"
        if self._perturbation is not None and self._perturbation[0] == 0:  # the tower did not move this step
            self._q[0] = self._apply_perturbation(0, self._q[0])
        q1 = self._q[0]
        if graph and record:
            if self._graph_q is None:  # the tower did not move this step: fresh leaves
                self._graph_q = [q.detach().requires_grad_(True) for q in self._q]
            q1 = self._graph_q[0]
        residual = []
        for gi, group in enumerate(self.param_groups):
            with_grad = [p for p in group["params"] if p.grad is not None]
            if not with_grad:
                continue
            for (_, _, step), params in self._partition(with_grad).items():
                bucket = self._bucket(params)
                t = float(step + 1)
                mode = group["weight_decay_mode"]
                flat_g = flatten([p.grad for p in params], copy=True)
                flat_x = flatten(params, copy=True) if needs_param(self.family, group["weight_decay"], mode) else None
                state = dict(bucket.flat)

                def fn(q, group=group, params=params, flat_g=flat_g, state=state, flat_x=flat_x, t=t, mode=mode):
                    h = self._model_h(group, params, q)
                    return displacement(self.family, flat_g, state, flat_x, h, t, mode)

                if not record:
                    delta, new_state = fn(q1)
                elif graph:
                    with torch.enable_grad():
                        delta, new_state = fn(q1)
                    residual.append((params, delta))
                    delta = delta.detach()
                    new_state = {n: v.detach() for n, v in new_state.items()}
                else:
                    delta, vjp_fn, new_state = torch.func.vjp(fn, q1, has_aux=True)
                    residual.append((params, vjp_fn))
                torch._foreach_add_(list(params), unflatten_like(delta.to(params[0].dtype), params))
                self._install_state(bucket, new_state)
                for p in params:
                    self.state[p]["step"] = step + 1
        self._residual0 = residual if record else None

    def __repr__(self):
        return (f"HyperOptimizer({self.family.name}, learn={list(self.learn)}, tower={self.tower}, "
                f"share={self.share!r}, backend={self.backend!r})")


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
