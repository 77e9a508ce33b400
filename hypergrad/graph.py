"""Pictures of families and towers: the expression DAG of a ``Family`` and the levels of a tower.

``family_graph(family)`` turns a family's direction expression into a ``networkx.DiGraph``:

* one node per input (``g``, ``x``, ``t``), per coefficient (``learnable``, ``domain``), per state's
  new value and per state's previous value, per operation, and one ``direction`` output node;
* the convex combinators (``interp`` and the weighted branches of a ``hull``) are
  ``kind="combinator"``; a ``hull`` over a simplex coefficient appears as one node;
* edges go from operand to result; each state's new value has an edge ``kind="recurrence"`` to its
  previous value (``m_t`` becomes ``m_(t-1)`` at the next step), so the recurrence is visible;
* numeric constants are folded into the labels of the operations that read them.

``family_graph(family, at="adam")`` (a vertex name or ``{coefficient: value}``) returns the *full*
graph with ``pruned=True`` on every node that the restriction ``family.at(...)`` removes (and
``fixed=value`` on the coefficients it fixes): a picture of the pruning.

``tower_graph(optimizer)`` draws the levels of a hyper-optimizer tower: the parameters ``x``, the
model's family (level 0), and each hyper-level, with ``kind="learns"`` edges from a level to the
coefficients of the level below that it updates.

``draw(graph, path)`` lays a graph out in layers (longest path from the sources; no graphviz) and
writes a PNG with matplotlib's Agg backend. ``python -m hypergrad.graph [DIR]`` writes the pictures
of ``docs/hypergradients.md`` (default ``docs/images``).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from optimizers import Family, get_rule
from optimizers import expr as E
from optimizers.domains import Simplex

__all__ = ["family_graph", "tower_graph", "draw", "KIND_COLORS"]

# Fill colours by node kind (the legend of every picture).
KIND_COLORS: Dict[str, str] = {
    "input": "#b8e0b0",
    "coefficient": "#ffc078",        # learnable coefficient
    "fixed coefficient": "#ffe8c8",  # declared learnable=False
    "state": "#8fbbe8",               # a carried buffer's new value
    "intermediate": "#d4e6f7",        # a named state that is not carried
    "prev": "#dcecfb",                # a buffer's previous value
    "op": "#eeeeee",
    "combinator": "#d9b8f0",
    "output": "#f4a3a3",
    "level": "#8fbbe8",
    "params": "#b8e0b0",
}
PRUNED_COLOR = "#ffffff"

_SYMBOLS = {"add": "+", "sub": "\u2212", "mul": "\u00d7", "div": "\u00f7", "pow": "^"}
_UNARY = {"neg": "\u2212{}", "sqrt": "\u221a{}", "square": "{}\u00b2", "abs": "|{}|", "sign": "sign {}"}


def _nx():
    import networkx as nx
    return nx


def _fmt(value: float) -> str:
    return f"{value:g}"


def _coef_node(name: str) -> str:
    return f"coef:{name}"


# ----------------------------------------------------------------------------------- family graph
class _Collapsed:
    """A recognisable pattern of several ops shown as one node: ``hull``, ``ema``, ``1 - b^t``."""

    def __init__(self, op: str, label: str, kind: str, operands: List[Tuple[E.Expr, str, str]]):
        self.op, self.label, self.kind, self.operands = op, label, kind, operands


def _add_terms(node: E.Expr) -> List[E.Expr]:
    terms, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, E.Op) and n.op == "add":
            stack.extend(reversed(n.args))
        else:
            terms.append(n)
    return terms


def _collapse(node: E.Expr) -> Optional[_Collapsed]:
    if not isinstance(node, E.Op):
        return None
    if node.op == "add":
        # hull: sum_i w[i] * e_i over a whole simplex coefficient w
        found: Dict[int, Tuple[E.Coef, E.Expr]] = {}
        name = None
        for term in _add_terms(node):
            if not (isinstance(term, E.Op) and term.op == "mul" and isinstance(term.args[0], E.Coef)
                    and term.args[0].index is not None):
                found = {}
                break
            w, e = term.args
            name = w.name if name is None else name
            if w.name != name or w.index in found:
                found = {}
                break
            found[w.index] = (w, e)
        if len(found) >= 2 and sorted(found) == list(range(len(found))):
            operands = [(found[i][1], str(i), "operand") for i in range(len(found))]
            operands += [(found[i][0], "w", "weight") for i in range(len(found))]
            return _Collapsed("hull", f"hull({name})", "combinator", operands)
        # ema: b * prev + (1 - b) * value
        a, b = node.args
        if (isinstance(a, E.Op) and a.op == "mul" and isinstance(b, E.Op) and b.op == "mul"
                and isinstance(b.args[0], E.Op) and b.args[0].op == "sub"
                and isinstance(b.args[0].args[0], E.Const) and b.args[0].args[0].value == 1.0
                and b.args[0].args[1] is a.args[0]):
            return _Collapsed("ema", "ema", "op", [(a.args[1], "a", "operand"), (b.args[1], "b", "operand"),
                                                  (a.args[0], "w", "operand")])
    if (node.op == "sub" and isinstance(node.args[0], E.Const) and node.args[0].value == 1.0
            and isinstance(node.args[1], E.Op) and node.args[1].op == "pow" and node.args[1].args[1] is E.step):
        return _Collapsed("bias_correction", "1 \u2212 \u00b7^t", "op", [(node.args[1].args[0], "0", "operand")])
    return None


def _operands(node: E.Expr, collapsed: Dict[int, _Collapsed]) -> List[Tuple[E.Expr, str, str]]:
    """``(operand, role, edge kind)`` of a node in the picture (patterns collapsed, Prev a source)."""
    if node.uid in collapsed:
        return collapsed[node.uid].operands
    if isinstance(node, E.State):
        return [(node.definition, "definition", "definition")]
    if isinstance(node, E.Op):
        if node.op == "interp":
            return [(a, r, "weight" if r == "w" else "operand") for a, r in zip(node.args, ("a", "b", "w"))]
        if node.op == "first_step":  # the step input is implied by the label
            return [(node.args[1], "a", "operand"), (node.args[2], "b", "operand")]
        return [(a, str(i), "operand") for i, a in enumerate(node.args)]
    return []


def _op_label(node: E.Op) -> str:
    def arg(a):
        return _fmt(a.value) if isinstance(a, E.Const) else "\u00b7"

    if node.op in _SYMBOLS:
        a, b = node.args
        return f"{arg(a)} {_SYMBOLS[node.op]} {arg(b)}"
    if node.op in _UNARY:
        return _UNARY[node.op].format(arg(node.args[0]))
    if node.op == "maximum":
        return "max(" + ", ".join(arg(a) for a in node.args) + ")"
    if node.op == "first_step":
        return "t = 1 ? a : b"
    return node.op  # interp


def _node_id(node: E.Expr, collapsed: Dict[int, _Collapsed]) -> Optional[str]:
    if isinstance(node, E.Const):
        return None
    if isinstance(node, E.Input):
        return f"input:{node.label()}"
    if isinstance(node, E.Coef):
        return _coef_node(node.name)
    if isinstance(node, E.State):
        return f"state:{node.name}"
    if isinstance(node, E.Prev):
        return f"prev:{node.state.name}"
    return f"{collapsed[node.uid].op if node.uid in collapsed else 'op'}:{node.uid}"


def _constant_points(family: Family, at) -> Dict[str, object]:
    if at is None:
        return {}
    if isinstance(at, str):
        if at not in family.vertices:
            raise ValueError(f"unknown vertex {at!r} of family {family.name!r}; allowed: {sorted(family.vertices)}")
        return dict(family.vertices[at])
    if not isinstance(at, Mapping):
        raise TypeError(f"at must be a vertex name or a mapping of coefficient values, got {type(at).__name__}")
    unknown = [k for k in at if k not in family.coefficients]
    if unknown:
        raise ValueError(f"{family.name!r} has no coefficient(s) {unknown}; coefficients: {sorted(family.coefficients)}")
    return dict(at)


def _known_values(nodes: Sequence[E.Expr], constants: Mapping[str, object]) -> Dict[int, float]:
    """Values of the nodes that fixing ``constants`` makes constant (what ``Family.at`` folds away)."""
    known: Dict[int, float] = {}
    for node in nodes:  # post-order: operands first
        v = None
        if isinstance(node, E.Const) and not isinstance(node.value, tuple):
            v = node.value
        elif isinstance(node, E.Coef) and node.name in constants:
            value = constants[node.name]
            v = float(tuple(float(x) for x in value)[node.index]) if node.index is not None else float(value)
        elif isinstance(node, E.Op):
            args = [known.get(a.uid) for a in node.args]
            op = node.op
            if op == "mul" and 0.0 in args:
                v = 0.0
            elif op == "div" and args[0] == 0.0:
                v = 0.0
            elif op == "pow" and args[0] in (0.0, 1.0):
                v = args[0]
            elif op == "interp" and args[2] in (0.0, 1.0):
                v = args[0] if args[2] == 1.0 else args[1]
            elif op not in ("first_step", "interp") and all(a is not None for a in args):
                try:
                    v = float(_EVAL[op](*args))
                except (ZeroDivisionError, ValueError):
                    v = None
        if v is not None:
            known[node.uid] = float(v)
    return known


_EVAL = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b, "div": lambda a, b: a / b,
    "pow": lambda a, b: a ** b, "neg": lambda a: -a, "sqrt": math.sqrt, "square": lambda a: a * a, "abs": abs,
    "sign": lambda a: (a > 0) - (a < 0), "maximum": max,
}


def family_graph(family: Union[Family, str], at: Union[str, Mapping[str, object], None] = None):
    """The expression DAG of ``family`` as a ``networkx.DiGraph`` (see the module docstring).

    Node ids: ``"input:g"``, ``"coef:beta1"``, ``"state:m"``, ``"prev:m"``, ``"op:<n>"`` (and
    ``"hull:<n>"``, ``"ema:<n>"``, ``"bias_correction:<n>"`` for those patterns, each drawn as one
    node) and ``"direction"``. Node attributes: ``kind`` (``input``, ``coefficient``, ``state``,
    ``intermediate``, ``prev``, ``op``, ``combinator``, ``output``) and ``label``; per kind
    ``learnable``/``domain``/``init`` (coefficients), ``init``/``scalar``/``carried`` (states),
    ``op`` (operations and combinators). A state is ``kind="state"`` when it is a carried buffer
    (in ``family.state_names``) and ``kind="intermediate"`` when only its new value is read.
    ``interp`` and ``hull`` are ``kind="combinator"``.

    Edge attributes: ``kind`` (``operand``; ``weight``: the weight of a combinator;
    ``definition``: a state's defining expression -> the state; ``recurrence``: a state's new
    value -> its previous value, read at the next step) and ``role`` (operand position, or
    ``a``/``b``/``w`` for ``interp`` and ``ema``). Without the recurrence edges the graph is acyclic.

    With ``at`` (a vertex name or ``{coefficient: value}``) the *full* graph is returned with
    ``pruned`` on every node: True where ``family.at(...)`` removes it (a branch weighted by 0, a
    buffer only such a branch reads, an operation folded to a constant, a fixed coefficient), and
    ``fixed`` (the value) on the coefficients it fixes.
    """
    nx = _nx()
    family = get_rule(family) if isinstance(family, str) else family
    constants = _constant_points(family, at)
    carried = set(family.state_names)

    # The nodes of the picture: from the direction through _operands, and from each Prev to its state.
    collapsed: Dict[int, _Collapsed] = {}
    order: List[E.Expr] = []
    seen = set()
    stack = [family.direction]
    while stack:
        node = stack.pop()
        if node.uid in seen:
            continue
        seen.add(node.uid)
        order.append(node)
        c = _collapse(node)
        if c is not None:
            collapsed[node.uid] = c
        stack.extend(a for a, _, _ in reversed(_operands(node, collapsed)))
        if isinstance(node, E.Prev):
            stack.append(node.state)

    G = nx.DiGraph(type="family", family=family.name, at=at if isinstance(at, str) else None)
    for node in order:
        nid = _node_id(node, collapsed)
        if nid is None or nid in G:
            continue
        if isinstance(node, E.Input):
            G.add_node(nid, kind="input", label=node.label())
        elif isinstance(node, E.Coef):
            c = family.coefficients[node.name]
            G.add_node(nid, kind="coefficient", label=node.name, learnable=c.learnable,
                       domain=c.domain.describe(), init=c.init, simplex=isinstance(c.domain, Simplex))
        elif isinstance(node, E.State):
            G.add_node(nid, kind="state" if node.name in carried else "intermediate", label=f"{node.name}_t",
                       name=node.name, init=node.init, scalar=node.scalar, carried=node.name in carried)
        elif isinstance(node, E.Prev):
            G.add_node(nid, kind="prev", label=f"{node.state.name}_(t-1)", name=node.state.name)
        elif node.uid in collapsed:
            c = collapsed[node.uid]
            G.add_node(nid, kind=c.kind, label=c.label, op=c.op)
        else:
            G.add_node(nid, kind="combinator" if node.op == "interp" else "op", label=_op_label(node), op=node.op)
    G.add_node("direction", kind="output", label="direction d_t")

    for node in order:
        nid = _node_id(node, collapsed)
        if nid is None:
            continue
        for a, role, kind in _operands(node, collapsed):
            aid = _node_id(a, collapsed)
            if aid is not None and not G.has_edge(aid, nid):
                G.add_edge(aid, nid, kind=kind, role=role)
        if isinstance(node, E.State) and f"prev:{node.name}" in G:
            G.add_edge(nid, f"prev:{node.name}", kind="recurrence", role="next step")
    root = _node_id(family.direction, collapsed)
    if root is not None:
        G.add_edge(root, "direction", kind="operand", role="0")

    if at is not None:
        _mark_pruned(G, family, order, collapsed, constants)
    return G


def _mark_pruned(G, family: Family, order: List[E.Expr], collapsed: Dict[int, _Collapsed],
                 constants: Mapping[str, object]):
    """Liveness from the direction once ``constants`` are fixed, on the raw expression.

    Mirrors the folding constructors: a node with a constant value is folded (nothing below it
    survives), ``interp`` with weight 0 or 1 keeps one branch, a read previous value keeps its
    state as a buffer.
    """
    raw = E.walk([family.direction])
    known = _known_values(raw, constants)
    live = set()
    stack = [family.direction]
    while stack:
        node = stack.pop()
        if node.uid in live:
            continue
        live.add(node.uid)
        if node.uid in known:
            continue
        if isinstance(node, E.Prev):
            stack.append(node.state)
            continue
        if isinstance(node, E.State):
            stack.append(node.definition)
            continue
        args = list(node.children())
        if isinstance(node, E.Op) and node.op == "interp" and known.get(args[2].uid) in (0.0, 1.0):
            args = [args[0] if known[args[2].uid] == 1.0 else args[1]]
        stack.extend(a for a in args if a.uid not in known)
    live_ids = {_node_id(n, collapsed) for n in order if n.uid in live and n.uid not in known}
    for nid, data in G.nodes(data=True):
        data["pruned"] = nid != "direction" and nid not in live_ids
        if data["kind"] == "coefficient" and data["label"] in constants:
            data["fixed"] = constants[data["label"]]


def pruned_names(graph) -> Dict[str, List[str]]:
    """``{"states": [...], "coefficients": [...]}`` marked pruned in a ``family_graph(..., at=...)``."""
    out: Dict[str, List[str]] = {"states": [], "coefficients": []}
    for _, d in graph.nodes(data=True):
        if d.get("pruned") and d["kind"] in ("state", "intermediate"):
            out["states"].append(d["name"])
        elif d.get("pruned") and d["kind"] == "coefficient":
            out["coefficients"].append(d["label"])
    return out


