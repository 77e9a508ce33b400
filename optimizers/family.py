"""``Family``: a parameterized optimizer declared once from an expression and its coefficients.

A family is the pair of pure functions of optax style,

    init_state(x)                         -> state
    update(g, state, x, h, t)             -> (direction, new_state)

with every hyperparameter in ``h`` (a dict of 0-D tensors or floats) passed explicitly, so that
``torch.func.vjp(lambda h: family.update(g, s, x, h, t)[0], h)`` *is* the one-step
hypergradient. The parameter update applied by the optimizers is

    x_t = x_{t-1} (1 - lr * wd) - lr * direction        (decoupled weight decay), or
    x_t = x_{t-1} - lr * direction(g + wd * x_{t-1})     (L2 weight decay), or
    x_t = (x_{t-1} - lr * direction) / (1 + lr * wd)     (proximal, Adan's default),

and the family records which one its reference implementation uses.
"""
from __future__ import annotations

import math
import operator
from numbers import Real
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

from . import expr as E
from .domains import Coefficient, Simplex

__all__ = ["Family", "WEIGHT_DECAY_MODES"]

WEIGHT_DECAY_MODES = ("decoupled", "l2", "proximal")


def _div(a, b):
    # ``1 / tensor`` (``expr.reciprocal``) as ``torch.reciprocal``: its derivative reuses the result
    # and needs no division (``Tensor.__rtruediv__`` does the same; this does not depend on it).
    if isinstance(b, torch.Tensor) and not isinstance(a, torch.Tensor) and a == 1:
        return torch.reciprocal(b)
    return a / b


_PY_OPS = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": _div,
    "neg": operator.neg,
    "pow": operator.pow,
}


# torch functions that need tensor arguments (a coefficient may arrive as a Python float)
_TENSOR_ONLY = frozenset({"maximum", "sqrt", "sign", "square", "abs"})

# Their values on finite Python floats (``Family.scalar_numbers``; a NaN never gets here), and the
# other ops that take plain numbers as they are.
_FLOAT_OPS = {
    "sqrt": math.sqrt,
    "sign": lambda x: float((x > 0) - (x < 0)),
    "square": lambda x: x * x,
    "abs": abs,
    "maximum": max,
    "first_step": E.OPS["first_step"],
    "interp": E.OPS["interp"],
}


class _NotNumbers(Exception):
    """A scalar subexpression that Python floats do not evaluate as torch would."""


class Family:
    """A parameterized optimizer: coefficients, buffers and an update direction.

    Args:
        name: identifier used in registries, errors and checkpoints.
        coefficients: the declared hyperparameters (every ``Coef`` in ``direction`` must be one).
        direction: the expression ``d_t`` with ``x_t = x_{t-1} - lr * d_t``.
        vertices: named points of the family, ``{"adam": {"beta3": 0, "c": 1, ...}}``.
        weight_decay_mode: default weight-decay convention, one of ``WEIGHT_DECAY_MODES``.
        doc: the equations, for documentation.
    """

    def __init__(
        self,
        name: str,
        coefficients: Sequence[Coefficient],
        direction,
        *,
        vertices: Optional[Mapping[str, Mapping[str, object]]] = None,
        weight_decay_mode: str = "decoupled",
        fixed: Optional[Mapping[str, object]] = None,
        doc: str = "",
    ):
        if not isinstance(name, str) or not name:
            raise ValueError(f"Family name must be a non-empty string, got {name!r}")
        self.name = name
        self.doc = doc
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
        self.weight_decay_mode = weight_decay_mode
        if isinstance(direction, str) or not isinstance(direction, (E.Expr, Real)):
            raise TypeError(f"Family {name!r} direction must be an Expr (built from grad, Coef, State...), "
                            f"got {direction!r}")
        self.direction = E.as_expr(direction)
        if isinstance(coefficients, (str, bytes)) or not hasattr(coefficients, "__iter__"):
            raise TypeError(f"Family {name!r} coefficients must be a sequence of Coefficient, got {coefficients!r}")
        self.fixed = dict(fixed or {})
        declared: Dict[str, Coefficient] = {}
        for c in coefficients:
            if not isinstance(c, Coefficient):
                raise TypeError(f"coefficients must be Coefficient declarations, got {c!r}")
            if c.name in declared:
                raise ValueError(f"coefficient {c.name!r} declared twice in family {name!r}")
            declared[c.name] = c

        nodes = E.walk([self.direction])
        simplex_indices: Dict[str, set] = {}
        used = []
        states = []
        self.uses_param = False
        for node in nodes:
            if isinstance(node, E.Coef):
                if node.name not in declared:
                    raise ValueError(
                        f"family {name!r} uses coefficient {node.name!r} but declares only {sorted(declared)}")
                if (node.index is not None) != isinstance(declared[node.name].domain, Simplex):
                    raise ValueError(f"coefficient {node.name!r}: index a Simplex coefficient (and only those)")
                if node.index is not None:
                    simplex_indices.setdefault(node.name, set()).add(node.index)
                if node.name not in used:
                    used.append(node.name)
            elif isinstance(node, E.State):
                if node.definition is None:
                    raise ValueError(f"family {name!r}: state {node.name!r} is used but never defined")
                if any(s.name == node.name and s is not node for s in states):
                    raise ValueError(f"family {name!r}: two different states are named {node.name!r}")
                if node not in states:
                    states.append(node)
            elif isinstance(node, E.Input) and node.kind == "param":
                self.uses_param = True
        for cname, indices in simplex_indices.items():
            size = declared[cname].domain.size
            if indices != set(range(size)):
                raise ValueError(f"family {name!r}: simplex coefficient {cname!r} has {size} weights but the "
                                 f"expression uses weights {sorted(indices)}; a hull needs one weight per branch")
        # A declared coefficient that the expression no longer reads (e.g. Lion's betas at
        # gamma = 1) is dropped, so passing it to the optimizer is an error rather than a no-op.
        self.coefficients: Dict[str, Coefficient] = {n: declared[n] for n in declared if n in used}
        # A state whose previous value is never read (e.g. SGD's buffer at momentum 0) is a named
        # intermediate, not a buffer: it is computed each step but not stored.
        carried = {n.state.uid for n in nodes if isinstance(n, E.Prev)}
        self.states: Tuple[E.State, ...] = tuple(s for s in states if s.uid in carried)
        self._check_acyclic(states)
        self._reachable_states = tuple(states)
        # Built now, not lazily: a compiled kernel tracing update() must not see the family change.
        self._plan = None
        self._frontier = None
        self._schedule()
        self._scalar_frontier()
        self.vertices: Dict[str, Dict[str, object]] = {}
        for vname, point in (vertices or {}).items():
            unknown = set(point) - set(declared)
            if unknown:
                raise ValueError(f"vertex {vname!r} of {name!r} fixes unknown coefficients {sorted(unknown)}")
            for k, v in point.items():
                declared[k].validate(v, what=f"vertex {vname!r} coefficient {k!r}")
            self.vertices[vname] = dict(point)
        self._declared = declared

    # ------------------------------------------------------------------ structure
    def _check_acyclic(self, states):
        """A state's new value may read other states' new values, but not in a cycle."""
        deps = {}
        for s in states:
            # only references to another state's *new* value order the computation; Prev does not
            deps[s.name] = {n.name for n in _new_value_refs(s.definition)}
        visiting, done = set(), set()

        def visit(n, path):
            if n in done:
                return
            if n in visiting:
                raise ValueError(f"family {self.name!r}: states depend on each other's new values in a cycle: "
                                 + " -> ".join(path + [n]))
            visiting.add(n)
            for m in deps.get(n, ()):
                visit(m, path + [n])
            visiting.discard(n)
            done.add(n)

        for n in deps:
            visit(n, [])

    @property
    def state_names(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.states)

    @property
    def gradient_states(self) -> Tuple[str, ...]:
        """The parameter-sized states whose new value is the step's gradient itself, ``s_t = g_t``
        (MADA's and Adan's ``g_prev``): a copy of the gradient, so a kept gradient can become that
        buffer instead of being copied into it (the hyper-learning paths do)."""
        return tuple(s.name for s in self.states
                     if not s.scalar and isinstance(s.definition, E.Input) and s.definition.kind == "grad")

    @property
    def learnable(self) -> Tuple[str, ...]:
        """Names of the coefficients learned by default."""
        return tuple(n for n, c in self.coefficients.items() if c.learnable)

    def defaults(self) -> Dict[str, object]:
        return {n: c.init for n, c in self.coefficients.items()}

    def __repr__(self):
        return (f"Family({self.name!r}, coefficients={list(self.coefficients)}, states={list(self.state_names)}"
                + (f", fixed={self.fixed}" if self.fixed else "") + ")")

    # ------------------------------------------------------------------ vertices / restriction
    def at(self, name: Optional[str] = None, **constants) -> "Family":
        """The sub-family with ``constants`` substituted for coefficients (pruned and simplified)."""
        for k, v in constants.items():
            if k not in self._declared:
                raise ValueError(f"{self.name!r} has no coefficient {k!r}; coefficients: {sorted(self._declared)}")
            self._declared[k].validate(v, what=f"coefficient {k!r}")
        (direction,) = E.substitute([self.direction], constants)
        remaining = [c for n, c in self._declared.items() if n not in constants]
        constants = {k: _canonical(v) for k, v in constants.items()}
        vertices = {v: {k: x for k, x in p.items() if k not in constants}
                    for v, p in self.vertices.items()
                    if all(_canonical(p.get(k, constants[k])) == constants[k] for k in constants)}
        return Family(
            name or f"{self.name}@" + ",".join(f"{k}={v}" for k, v in constants.items()),
            remaining, direction, vertices=vertices,
            weight_decay_mode=self.weight_decay_mode,
            fixed={**self.fixed, **constants}, doc=self.doc,
        )

    def vertex(self, name: str) -> "Family":
        """The named vertex, e.g. ``MADA.vertex("adam")``; its unused branches and buffers are pruned."""
        if name not in self.vertices:
            raise ValueError(f"unknown vertex {name!r} of family {self.name!r}; allowed: {sorted(self.vertices)}")
        return self.at(name, **self.vertices[name])

    def with_weight_decay(self, mode: str, name: Optional[str] = None) -> "Family":
        """The same rule with another weight-decay convention (Adam -> AdamW)."""
        return Family(name or self.name, list(self._declared.values()), self.direction, vertices=self.vertices,
                      weight_decay_mode=mode, fixed=self.fixed, doc=self.doc)

    # ------------------------------------------------------------------ the pure functions
    def init_state(self, like: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Fresh buffers: parameter-shaped (or 0-D for scalar states), filled with each state's init."""
        out = {}
        for s in self.states:
            if s.scalar:
                out[s.name] = torch.full((), s.init, dtype=like.dtype, device=like.device)
            else:
                out[s.name] = torch.full_like(like, s.init, memory_format=torch.contiguous_format)
        return out

    def update(self, grad: torch.Tensor, state: Mapping[str, torch.Tensor], param: Optional[torch.Tensor],
               h: Mapping[str, object], t, precomputed: Optional[Mapping[int, object]] = None,
               ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One step of the rule: returns the direction ``d_t`` and the new buffers (inputs untouched).

        ``t`` is the 1-based step count, a 0-D tensor (or a number) in a floating dtype.
        ``precomputed`` maps node ids to values computed beforehand (``scalar_values``).
        """
        values: Dict[int, object] = {}
        for node, free in self._schedule():
            if precomputed is not None and node.uid in precomputed:
                v = precomputed[node.uid]
            elif isinstance(node, E.Const):
                v = node.value
            elif isinstance(node, E.Input):
                v = grad if node.kind == "grad" else t if node.kind == "step" else param
                if v is None:
                    raise ValueError(f"family {self.name!r} reads the parameter but none was given")
            elif isinstance(node, E.Coef):
                try:
                    v = h[node.name]
                except KeyError:
                    raise KeyError(f"family {self.name!r} needs coefficient {node.name!r}; got {sorted(h)}") from None
                if node.index is not None:
                    v = v[node.index]
            elif isinstance(node, E.Prev):
                v = state[node.state.name]
            elif isinstance(node, E.State):
                v = values[node.definition.uid]
            else:
                args = [values[a.uid] for a in node.args]
                fn = _PY_OPS.get(node.op)
                if fn is not None:
                    v = fn(*args)
                elif node.op in _TENSOR_ONLY:
                    v = E.OPS[node.op](*[a if isinstance(a, torch.Tensor)
                                         else torch.as_tensor(a, dtype=grad.dtype, device=grad.device) for a in args])
                else:
                    v = E.OPS[node.op](*args)
            values[node.uid] = v
            for uid in free:  # drop intermediates after their last use: peak memory, not total
                del values[uid]
        return values[self.direction.uid], {s.name: values[s.uid] for s in self.states}

    def scalar_values(self, h: Mapping[str, object], t) -> Dict[int, object]:
        """Values of the scalar-only subexpressions that elementwise operations consume.

        Bias corrections ``1 - beta^t`` and the like depend on coefficients and the step only. A
        fused kernel that took them as expressions would recompute a ``pow`` per element; computed
        here once per step, they enter the kernel as inputs (``update(..., precomputed=...)``).
        Subexpressions that read a buffer (even a scalar one) are not included.
        """
        dummy = torch.zeros(())

        def apply(op, args):
            fn = _PY_OPS.get(op)
            return fn(*args) if fn is not None else E.OPS[op](*[
                a if isinstance(a, torch.Tensor) else torch.as_tensor(a, dtype=dummy.dtype) for a in args])

        return self._scalar_subexpressions(h, t, apply)

    def scalar_numbers(self, h: Mapping[str, object], t) -> Optional[Dict[int, float]]:
        """``scalar_values`` as Python floats (float64 arithmetic, no tensor made: a few microseconds,
        where a 0-D tensor operation each cost ~70 us per bucket and step), when the coefficients it
        reads and ``t`` are plain numbers and every value it computes is a finite float; ``None``
        otherwise (a tensor coefficient, an op without a float form, a NaN...): then use
        ``scalar_values``, which keeps torch's semantics for those."""
        def number(v):  # a tensor, a complex power, an overflow, a NaN: torch's semantics decide
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _NotNumbers
            return v

        def apply(op, args):
            fn = _PY_OPS.get(op) or _FLOAT_OPS.get(op)
            if fn is None:
                raise _NotNumbers
            return number(fn(*args))

        try:
            out = self._scalar_subexpressions(h, number(t), apply, number)
        except (_NotNumbers, ArithmeticError, ValueError):  # ZeroDivisionError, sqrt of a negative...
            return None
        return {uid: float(v) for uid, v in out.items()}

    def _scalar_subexpressions(self, h: Mapping[str, object], t, apply, leaf=lambda v: v) -> Dict[int, object]:
        """The values of ``_scalar_frontier``: constants, coefficients (through ``leaf``) and ``t``
        combined by ``apply(op, args)``."""
        frontier = self._scalar_frontier()
        if not frontier:
            return {}
        values: Dict[int, object] = {}
        for node in self._scalar_nodes:
            if isinstance(node, E.Const):
                v = node.value
            elif isinstance(node, E.Input):
                v = t
            elif isinstance(node, E.Coef):
                v = leaf(h[node.name] if node.index is None else h[node.name][node.index])
            else:
                v = apply(node.op, [values[a.uid] for a in node.args])
            values[node.uid] = v
        return {uid: values[uid] for uid in frontier}

    def _scalar_frontier(self):
        if self._frontier is None:
            # Buffers (parameter-shaped or scalar, like NAdam's running product) are never part of
            # it: what reads a buffer is evaluated with the buffers, inside the update.
            scalar = set()
            for node, _ in self._schedule():
                if isinstance(node, (E.Const, E.Coef)) or (isinstance(node, E.Input) and node.kind == "step"):
                    scalar.add(node.uid)
                elif isinstance(node, E.Op) and all(a.uid in scalar for a in node.args):
                    scalar.add(node.uid)
            frontier = set()
            reads: Dict[int, frozenset] = {}  # scalar node -> the coefficients it reads
            for node, _ in self._schedule():
                operands = node.args if isinstance(node, E.Op) else (node.definition,) if isinstance(node, E.State) else ()
                if node.uid in scalar:
                    reads[node.uid] = (frozenset((node.name,)) if isinstance(node, E.Coef) else
                                       frozenset().union(*(reads[a.uid] for a in operands)))
                else:
                    frontier.update(a.uid for a in operands if a.uid in scalar and isinstance(a, E.Op))
            self._scalar_uids, self._frontier = scalar, tuple(sorted(frontier))
            # in evaluation order, the nodes that frontier reads (directly or not): per step, only these
            needed = set(frontier)
            for node, _ in reversed(self._schedule()):
                if node.uid in needed and isinstance(node, E.Op):
                    needed.update(a.uid for a in node.args)
            self._scalar_nodes = tuple(node for node, _ in self._schedule() if node.uid in needed)
            self._scalar_reads = {uid: reads[uid] for uid in self._frontier}
        return self._frontier

    def scalar_coefficients(self) -> Dict[int, frozenset]:
        """For each value of ``scalar_values`` (by node id), the names of the coefficients it reads.

        A kernel differentiating the update with respect to some coefficients hoists the scalars
        that read them as functions of those coefficients (their derivative is a 0-D chain rule),
        and the others as constants.
        """
        self._scalar_frontier()
        return dict(self._scalar_reads)

    def _schedule(self):
        """Evaluation order (operands first) with, for each node, the values that die after it."""
        if self._plan is None:
            outputs = [self.direction, *self.states]
            # every reachable state is a root: a carried buffer's update may appear nowhere else
            order = E.walk([self.direction, *self._reachable_states], follow_prev=False)
            last_use = {n.uid: i for i, n in enumerate(order)}
            for i, n in enumerate(order):
                operands = n.args if isinstance(n, E.Op) else (n.definition,) if isinstance(n, E.State) else ()
                for a in operands:
                    last_use[a.uid] = max(last_use[a.uid], i)
            keep = {n.uid for n in outputs}
            free = [[] for _ in order]
            for uid, i in last_use.items():
                if uid not in keep:
                    free[i].append(uid)
            self._plan = [(n, tuple(f)) for n, f in zip(order, free)]
        return self._plan


def _canonical(value):
    """A coefficient value as a float, or a tuple of floats for simplex weights (lists, tensors...)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().tolist()
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    return float(value)


def _new_value_refs(expr) -> Iterable[E.State]:
    """States referenced by their new value in ``expr`` (not through ``Prev``), not looking inside them."""
    seen, out, stack = set(), [], [expr]
    while stack:
        node = stack.pop()
        if node.uid in seen:
            continue
        seen.add(node.uid)
        if isinstance(node, E.State):
            out.append(node)
            continue
        if isinstance(node, E.Prev):
            continue
        stack.extend(node.children())
    return out
