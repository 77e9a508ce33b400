"""A small expression language for elementwise update rules.

An update rule is written once, symbolically, from a handful of leaves

* ``grad`` (g_t), ``param`` (x_{t-1}), ``step`` (t, counted from 1),
* ``Coef("beta1")`` (a hyperparameter, read from the dict ``h`` at run time),
* ``State("m")`` (a named optimizer buffer; ``m.prev`` is its value at t-1, ``m`` itself its
  value at t, defined by ``m.define(expr)``),

and elementwise operations (``+ - * /``, ``sqrt``, ``sign``, ``square``, ``maximum``...) plus the
convex combinators ``interp(a, b, w) = w a + (1-w) b`` and ``hull([a, b, ...], w)`` with ``w`` on
a simplex.

Why symbolic rather than plain Python functions: the same declaration gives

1. the pure update function ``(g, state, x, h, t) -> (direction, new_state)`` (``Family.update``)
   that ``torch.func`` differentiates with respect to ``h`` — nothing is closed over;
2. *vertices*: substituting constants for coefficients simplifies the expression
   (``interp(a, b, 1) -> a``, ``0 * n -> 0``), so Adam-as-a-vertex-of-MADA carries no Yogi, Lion
   or Adan state — the unused branches and their buffers are pruned, not computed and discarded;
3. a graph of the family (networkx) for pictures and documentation.

The smart constructors below fold constants while the expression is built; nothing here touches
tensors until ``evaluate`` runs.
"""
from __future__ import annotations

import itertools
from numbers import Real
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch

__all__ = [
    "Expr", "Const", "Input", "Coef", "State", "Prev", "Op",
    "grad", "param", "step", "const",
    "sqrt", "sign", "square", "maximum", "absolute", "first_step", "interp", "hull", "ema",
    "bias_correction", "reciprocal", "is_uniform", "as_expr",
]

_ids = itertools.count()


class Expr:
    """Base node. Nodes are immutable and compared by identity (they form a DAG)."""

    __slots__ = ("uid",)

    def __init__(self):
        self.uid = next(_ids)

    # Arithmetic builds (simplified) nodes.
    def __add__(self, other): return add(self, other)
    def __radd__(self, other): return add(other, self)
    def __sub__(self, other): return sub(self, other)
    def __rsub__(self, other): return sub(other, self)
    def __mul__(self, other): return mul(self, other)
    def __rmul__(self, other): return mul(other, self)
    def __truediv__(self, other): return div(self, other)
    def __rtruediv__(self, other): return div(other, self)
    def __neg__(self): return neg(self)
    def __pow__(self, other): return power(self, other)
    def __rpow__(self, other): return power(other, self)

    def children(self) -> tuple:
        return ()

    def label(self) -> str:  # pragma: no cover - overridden
        return type(self).__name__


class Const(Expr):
    """A numeric constant (a Python float; a tuple for simplex weights)."""

    __slots__ = ("value",)

    def __init__(self, value):
        super().__init__()
        self.value = tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else float(value)

    def label(self):
        return repr(self.value)

    def __repr__(self):
        return f"Const({self.value!r})"


class Input(Expr):
    """The per-step inputs: ``grad`` g_t, ``param`` x_{t-1}, ``step`` t (a 0-D tensor, t >= 1)."""

    __slots__ = ("kind",)
    KINDS = ("grad", "param", "step")

    def __init__(self, kind: str):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"Input kind must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind

    def label(self):
        return {"grad": "g", "param": "x", "step": "t"}[self.kind]

    def __repr__(self):
        return self.kind


grad = Input("grad")
param = Input("param")
step = Input("step")


class Coef(Expr):
    """A reference to the coefficient ``name``; ``index`` selects one weight of a simplex coefficient."""

    __slots__ = ("name", "index")

    def __init__(self, name: str, index: Optional[int] = None):
        super().__init__()
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"Coef name must be an identifier, got {name!r}")
        self.name = name
        self.index = index

    def __getitem__(self, i: int) -> "Coef":
        return Coef(self.name, i)

    def label(self):
        return self.name if self.index is None else f"{self.name}[{self.index}]"

    def __repr__(self):
        return f"Coef({self.label()})"


class State(Expr):
    """A named optimizer buffer.

    ``State`` used in an expression is the buffer's *new* value (after this step's update, i.e. its
    definition); ``state.prev`` is the value carried from the previous step (``init`` at t=1).
    ``scalar=True`` makes a 0-D buffer (e.g. NAdam's running product of momentum factors).
    """

    __slots__ = ("name", "init", "scalar", "definition", "prev")

    def __init__(self, name: str, init: float = 0.0, scalar: bool = False, definition: Optional[Expr] = None):
        super().__init__()
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"State name must be an identifier, got {name!r}")
        if isinstance(init, bool) or not isinstance(init, Real):
            raise TypeError(f"State {name!r} init must be a real number, got {init!r}")
        self.name = name
        self.init = float(init)
        self.scalar = bool(scalar)
        self.definition = None
        self.prev = Prev(self)
        if definition is not None:
            self.define(definition)

    def define(self, expr) -> "State":
        if self.definition is not None:
            raise ValueError(f"State {self.name!r} is already defined")
        if isinstance(expr, str):
            raise TypeError(f"State {self.name!r} definition must be an Expr or a number, got the string {expr!r}")
        self.definition = as_expr(expr)
        return self

    def children(self):
        return (self.definition,) if self.definition is not None else ()

    def label(self):
        return f"{self.name}_t"

    def __repr__(self):
        return f"State({self.name})"


class Prev(Expr):
    """The value of ``state`` carried from the previous step."""

    __slots__ = ("state",)

    def __init__(self, state: State):
        super().__init__()
        self.state = state

    def label(self):
        return f"{self.state.name}_(t-1)"

    def __repr__(self):
        return f"{self.state.name}.prev"


class Op(Expr):
    """An elementwise operation ``op(*args)``; see ``OPS`` for the list.

    ``uniform``: the operands (hence the result) have one value for all elements (see ``is_uniform``).
    """

    __slots__ = ("op", "args", "uniform")

    def __init__(self, op: str, args: Sequence[Expr]):
        super().__init__()
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; allowed: {sorted(OPS)}")
        self.op = op
        self.args = tuple(args)
        self.uniform = all(is_uniform(a) for a in self.args)

    def children(self):
        return self.args

    def label(self):
        return self.op

    def __repr__(self):
        return f"{self.op}({', '.join(map(repr, self.args))})"


class _SafeSqrt(torch.autograd.Function):
    """``sqrt(v)`` whose derivative is 0 (not inf) where ``v == 0``.

    sqrt'(0) is infinite: a parameter whose gradient has always been 0 (an unused embedding row)
    has v = 0 and would turn the hypergradient into inf * 0 = NaN. The limit of the true
    contribution there is 0 (v stays 0 to first order when its gradient is 0). The forward pass is
    a plain ``torch.sqrt``: the fix costs nothing unless something differentiates.
    Written in the ``setup_context`` style so that ``torch.func.vjp`` accepts it; no custom ``jvp``
    (``torch.compile`` cannot trace one), so forward-mode AD is not supported through it.
    """

    @staticmethod
    def forward(v):
        return torch.sqrt(v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_out):
        (root,) = ctx.saved_tensors
        return torch.where(root > 0, grad_out / (2 * root), torch.zeros_like(grad_out))


def is_uniform(x: Expr) -> bool:
    """Whether ``x`` has one value for all elements: it is built from constants, coefficients and
    the step only (a bias correction, ``1 / t``...), not from the gradient, the parameter or a buffer.
    Such subexpressions are computed once per step (``Family.scalar_values``) by the fused kernels."""
    if isinstance(x, Op):
        return x.uniform
    if isinstance(x, Input):
        return x.kind == "step"
    return isinstance(x, (Const, Coef))


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    return _SafeSqrt.apply(v)


def _first_step(t, a, b):
    if not isinstance(t, torch.Tensor):  # eager optimizers pass t as a Python number
        return a if t == 1 else b
    return torch.where(t == 1, a, b)


class _Interp(torch.autograd.Function):
    """``w a + (1 - w) b`` whose derivative with respect to ``w`` is one reduction, ``sum(g (a - b))``.

    Autograd would reduce ``g a`` and ``g b`` separately (``1 - w`` is a tensor of its own), two sums
    over the elements in the fused vjp kernel instead of one. The forward is the plain formula, the
    derivatives are the same (differentiable: higher orders go through them).
    """

    @staticmethod
    def forward(a, b, w):
        return w * a + (1 - w) * b

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(x if isinstance(x, torch.Tensor) else None for x in inputs))
        ctx.numbers = tuple(None if isinstance(x, torch.Tensor) else x for x in inputs)

    @staticmethod
    def backward(ctx, grad_out):
        a, b, w = (t if t is not None else n for t, n in zip(ctx.saved_tensors, ctx.numbers))
        need_a, need_b, need_w = ctx.needs_input_grad
        return (_sum_to(grad_out * w, a) if need_a else None,
                _sum_to(grad_out * (1 - w), b) if need_b else None,
                _sum_to(grad_out * (a - b), w) if need_w else None)


def _sum_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the dimensions that ``like`` was broadcast along."""
    return x.sum_to_size(like.shape) if x.shape != like.shape else x


def _interp(a, b, w):
    if not any(isinstance(x, torch.Tensor) for x in (a, b, w)):
        return w * a + (1 - w) * b
    return _Interp.apply(a, b, w)


OPS: Dict[str, Callable] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "neg": torch.neg,
    "pow": torch.pow,
    "sqrt": _safe_sqrt,
    "sign": torch.sign,
    "square": torch.square,
    "abs": torch.abs,
    "maximum": torch.maximum,
    "first_step": _first_step,
    "interp": _interp,
}


# ----------------------------------------------------------------------------- smart constructors

def as_expr(x) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, bool) or not isinstance(x, (Real, tuple, list)):
        raise TypeError(f"cannot use {type(x).__name__} {x!r} in an update rule expression; use a number or an Expr")
    return Const(x)


def const(value) -> Const:
    return Const(value)


def _is_const(x, value=None) -> bool:
    return isinstance(x, Const) and not isinstance(x.value, tuple) and (value is None or x.value == value)


def add(a, b):
    a, b = as_expr(a), as_expr(b)
    if _is_const(a) and _is_const(b):
        return Const(a.value + b.value)
    if _is_const(a, 0.0):
        return b
    if _is_const(b, 0.0):
        return a
    return Op("add", (a, b))


def sub(a, b):
    a, b = as_expr(a), as_expr(b)
    if _is_const(a) and _is_const(b):
        return Const(a.value - b.value)
    if _is_const(b, 0.0):
        return a
    if _is_const(a, 0.0):
        return neg(b)
    return Op("sub", (a, b))


def mul(a, b):
    a, b = as_expr(a), as_expr(b)
    if _is_const(a) and _is_const(b):
        return Const(a.value * b.value)
    if _is_const(a, 0.0) or _is_const(b, 0.0):
        return Const(0.0)
    if _is_const(a, 1.0):
        return b
    if _is_const(b, 1.0):
        return a
    return Op("mul", (a, b))


def div(a, b):
    a, b = as_expr(a), as_expr(b)
    if _is_const(b, 0.0):
        raise ZeroDivisionError("update rule divides by the constant 0")
    if _is_const(a) and _is_const(b):
        return Const(a.value / b.value)
    if _is_const(a, 0.0):
        return Const(0.0)
    if _is_const(b, 1.0):
        return a
    if is_uniform(b) and not is_uniform(a):
        # A per-element quantity over a per-step scalar (a bias correction, the step count): a
        # multiplication by the scalar's reciprocal, which the fused kernels compute once per step
        # (``Family.scalar_values``), rather than a division per element — and two more in its
        # derivative with respect to the scalar.
        return mul(a, reciprocal(b))
    return Op("div", (a, b))


def reciprocal(a):
    """``1 / a``. Evaluated as ``torch.reciprocal`` on tensors: its derivative ``-g r^2`` reuses the
    result ``r`` and needs no division (``x / y``'s derivative with respect to ``y`` has two)."""
    return div(1.0, a)


def neg(a):
    a = as_expr(a)
    if _is_const(a):
        return Const(-a.value)
    return Op("neg", (a,))


def power(a, b):
    a, b = as_expr(a), as_expr(b)
    if _is_const(a) and _is_const(b):
        return Const(a.value ** b.value)
    if _is_const(b, 1.0):
        return a
    if _is_const(a, 0.0):
        # 0 ** t for t >= 1 (bias corrections with beta = 0)
        return Const(0.0)
    if _is_const(a, 1.0):
        return Const(1.0)
    return Op("pow", (a, b))


def _unary(name, fold):
    def build(a):
        a = as_expr(a)
        if _is_const(a):
            return Const(fold(a.value))
        return Op(name, (a,))
    build.__name__ = name
    return build


sqrt = _unary("sqrt", lambda v: v ** 0.5)
sqrt.__doc__ = "Elementwise square root with a finite derivative at 0 (see ``_safe_sqrt``)."
sign = _unary("sign", lambda v: float((v > 0) - (v < 0)))
square = _unary("square", lambda v: v * v)
absolute = _unary("abs", abs)


def maximum(a, b):
    """Elementwise maximum (AMSGrad's running max)."""
    a, b = as_expr(a), as_expr(b)
    if _is_const(a) and _is_const(b):
        return Const(max(a.value, b.value))
    return Op("maximum", (a, b))


def first_step(at_first, otherwise):
    """``at_first`` when t == 1, else ``otherwise`` (torch's SGD seeds its momentum buffer with g_1)."""
    at_first, otherwise = as_expr(at_first), as_expr(otherwise)
    if at_first is otherwise:
        return at_first
    return Op("first_step", (step, at_first, otherwise))


def interp(a, b, w):
    """Convex interpolation ``w * a + (1 - w) * b``; ``w = 1`` is ``a``'s vertex, ``w = 0`` is ``b``'s.

    With a constant weight the unused branch is dropped from the expression, and with it every
    buffer only that branch needed.
    """
    a, b, w = as_expr(a), as_expr(b), as_expr(w)
    if _is_const(w, 1.0):
        return a
    if _is_const(w, 0.0):
        return b
    if _is_const(w):
        return add(mul(w, a), mul(Const(1.0 - w.value), b))
    return Op("interp", (a, b, w))


def hull(exprs: Sequence, weights) -> Expr:
    """Convex combination ``sum_i w_i e_i`` with ``w`` on the simplex.

    ``weights`` is a ``Coef`` whose domain is a ``Simplex`` of size ``len(exprs)`` (or a tuple of
    constants at a vertex; zero weights prune their branch).
    """
    exprs = [as_expr(e) for e in exprs]
    if len(exprs) < 2:
        raise ValueError(f"hull needs at least 2 expressions, got {len(exprs)}")
    if isinstance(weights, (tuple, list)):
        weights = Const(tuple(weights))
    if isinstance(weights, Const):
        if not isinstance(weights.value, tuple) or len(weights.value) != len(exprs):
            raise ValueError(f"hull weights must have {len(exprs)} entries, got {weights.value!r}")
        total = Const(0.0)
        for e, w in zip(exprs, weights.value):
            total = add(total, mul(Const(w), e))
        return total
    if not isinstance(weights, Coef) or weights.index is not None:
        raise TypeError(f"hull weights must be a simplex Coef or a tuple of constants, got {weights!r}")
    total = Const(0.0)
    for i, e in enumerate(exprs):
        total = add(total, mul(weights[i], e))
    return total


def ema(previous, value, beta):
    """Exponential moving average ``beta * previous + (1 - beta) * value``."""
    return add(mul(beta, previous), mul(sub(1.0, beta), value))


def bias_correction(beta):
    """``1 - beta**t`` with the *current* coefficient value (design.md §2)."""
    return sub(1.0, power(beta, step))


# ----------------------------------------------------------------------------- graph utilities

def walk(roots: Iterable[Expr], follow_prev: bool = True) -> list:
    """All nodes reachable from ``roots``, operands before their users.

    ``follow_prev`` also follows ``Prev`` to its state (to find every buffer a family carries); an
    evaluation order must not, since a previous value does not depend on this step's new value.
    """
    seen, order = set(), []
    stack = [(r, False) for r in reversed(list(roots))]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node.uid in seen:
            continue
        seen.add(node.uid)
        stack.append((node, True))
        kids = list(node.children())
        if isinstance(node, Prev) and follow_prev:
            kids.append(node.state)
        for k in reversed(kids):
            if k.uid not in seen:
                stack.append((k, False))
    return order


def substitute(roots: Sequence[Expr], constants: Dict[str, object]) -> list:
    """Rebuild ``roots`` with the coefficients in ``constants`` replaced by ``Const`` and re-simplified.

    States are copied (a vertex owns its own buffers); pruning happens because the smart
    constructors drop dead branches while rebuilding.
    """
    memo: Dict[int, Expr] = {}
    pending_states = []

    def rebuild(node: Expr) -> Expr:
        if node.uid in memo:
            return memo[node.uid]
        if isinstance(node, (Const, Input)):
            out = node
        elif isinstance(node, Coef):
            if node.name in constants:
                value = constants[node.name]
                if node.index is not None:
                    out = Const(tuple(value)[node.index])
                else:
                    out = Const(value)
            else:
                out = node
        elif isinstance(node, State):
            out = State(node.name, node.init, node.scalar)
            memo[node.uid] = out  # before rebuilding the definition: it may refer to node.prev
            pending_states.append((node, out))
            return out
        elif isinstance(node, Prev):
            out = rebuild(node.state).prev
        elif isinstance(node, Op):
            args = [rebuild(a) for a in node.args]
            out = _REBUILD[node.op](*args)
        else:  # pragma: no cover
            raise TypeError(f"unknown node {node!r}")
        memo[node.uid] = out
        return out

    new_roots = [rebuild(r) for r in roots]
    while pending_states:
        old, new = pending_states.pop()
        if old.definition is not None and new.definition is None:
            new.define(rebuild(old.definition))
    return new_roots


_REBUILD: Dict[str, Callable] = {
    "add": add, "sub": sub, "mul": mul, "div": div, "neg": neg, "pow": power,
    "sqrt": sqrt, "sign": sign, "square": square, "abs": absolute, "maximum": maximum,
    "first_step": lambda t, a, b: first_step(a, b), "interp": interp,
}
