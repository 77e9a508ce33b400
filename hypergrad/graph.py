"""Pictures of families and towers: the expression DAG of a ``Family`` and the levels of a tower.

``family_graph(family)`` turns a family's direction expression into a ``networkx.DiGraph``:

* one node per input (``g``, ``x``, ``t``), per coefficient (``learnable``, ``domain``), per state's
  new value (``m_t``) and previous value (``m_(t-1)``), per operation, and a ``direction`` output;
* the convex combinators ``interp`` and ``hull`` (the sum of ``w[i] * e_i`` over a simplex
  coefficient, shown as one node) are ``kind="combinator"``; two other patterns are shown as one
  node each: ``ema`` (``w a + (1-w) b``) and the bias correction ``1 - b^t``;
* edges go from operand to result, labelled ``a``/``b``/``w`` where the order matters; each
  state's new value has a ``kind="recurrence"`` edge to its previous value (``m_t`` is read as
  ``m_(t-1)`` at the next step), so the recurrence is visible;
* numeric constants are folded into the labels of the operations that read them.

``family_graph(family, at="adam")`` (a vertex name or ``{coefficient: value}``) returns the *full*
graph with ``pruned=True`` on every node that ``family.at(...)`` removes: a picture of the pruning.

``tower_graph(optimizer)`` draws the levels of a hyper-optimizer tower: the parameters ``x``, the
model's family (level 0), and each hyper-level, with ``kind="learns"`` edges from a level to the
coefficients of the level below that it updates.

``draw(graph, path)`` lays graphs out in layers, top to bottom (longest path from the sources,
dummy nodes along long edges, barycentre ordering: a small Sugiyama layout, no graphviz) and writes
a PNG with matplotlib's Agg canvas. ``python -m hypergrad.graph [DIR]`` writes the pictures of
``docs/hypergradients.md`` (default ``docs/images``).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from optimizers import Family, get_rule
from optimizers import expr as E
from optimizers.domains import Simplex

__all__ = ["family_graph", "tower_graph", "draw", "layout", "pruned_names", "KIND_COLORS"]

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
_NONCOMMUTATIVE = ("sub", "div", "pow")
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
        if node.op in _NONCOMMUTATIVE and not any(isinstance(a, E.Const) for a in node.args):
            return [(a, r, "operand") for a, r in zip(node.args, ("a", "b"))]
        return [(a, str(i), "operand") for i, a in enumerate(node.args)]
    return []


def _op_label(node: E.Op) -> str:
    def arg(a):
        return _fmt(a.value) if isinstance(a, E.Const) else "\u00b7"

    if node.op in _SYMBOLS:
        a, b = node.args
        if node.op in _NONCOMMUTATIVE and not any(isinstance(x, E.Const) for x in node.args):
            return f"a {_SYMBOLS[node.op]} b"  # the edges are labelled a and b
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
    ``fixed`` (the value) on the coefficients it fixes; a state node gets ``carried_at``: whether it
    is still a buffer there (its previous value still read), i.e. in ``family.at(...).state_names``.
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

    where = None if at is None else at if isinstance(at, str) else ", ".join(f"{k}={v}" for k, v in constants.items())
    G = nx.DiGraph(type="family", family=family.name, at=where)
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
    for nid, data in G.nodes(data=True):
        if data["kind"] in ("state", "intermediate"):
            # still a carried buffer at the restriction only if its previous value is still read
            prev = G.nodes.get(f"prev:{data['name']}")
            data["carried_at"] = prev is not None and not prev["pruned"]


def pruned_names(graph) -> Dict[str, List[str]]:
    """What a ``family_graph(..., at=...)`` removes: ``{"states": buffers no longer carried,
    "coefficients": coefficients fixed or no longer read}``."""
    out: Dict[str, List[str]] = {"states": [], "coefficients": []}
    for _, d in graph.nodes(data=True):
        if d["kind"] in ("state", "intermediate") and d.get("carried") and not d.get("carried_at", True):
            out["states"].append(d["name"])
        elif d.get("pruned") and d["kind"] == "coefficient":
            out["coefficients"].append(d["label"])
    return out


# ----------------------------------------------------------------------------------- tower graph
def tower_graph(optimizer_or_levels, learn: Optional[Sequence[str]] = None):
    """The levels of a hyper-optimizer tower as a ``networkx.DiGraph``.

    ``optimizer_or_levels`` is a ``HyperOptimizer`` or a sequence ``[family, Level, Level, ...]``
    (the model's family or rule name, then the tower bottom first; ``learn`` names the model
    coefficients level 1 learns, default the family's learnable ones).

    Nodes: ``"params"`` (the model's parameters x, ``kind="params"``), ``"level0"`` (the model's
    family) ... ``"levelL"`` (``kind="level"``, attributes ``level``, ``rule``, ``lr``), and one
    ``kind="coefficient"`` node ``"level{k}.{name}"`` per hyperparameter of level k that level k+1
    learns. Edges: ``level{k+1} -> level{k}.{name}`` with ``kind="learns"`` and ``name``;
    ``level{k}.{name} -> level{k}`` with ``kind="hyperparameter"``; ``level0 -> params`` with
    ``kind="updates"``.
    """
    nx = _nx()
    if hasattr(optimizer_or_levels, "tower") and hasattr(optimizer_or_levels, "family"):
        opt = optimizer_or_levels
        family, levels, learned = opt.family, list(opt.tower), list(opt.learn)
    else:
        items = list(optimizer_or_levels)
        if not items:
            raise ValueError("tower_graph needs a HyperOptimizer or [family, Level, ...]")
        family = get_rule(items[0]) if isinstance(items[0], str) else items[0]
        if not isinstance(family, Family):
            raise TypeError(f"the first item must be the model's Family or rule name, got {type(items[0]).__name__}")
        levels = items[1:]
        learned = list(family.learnable if learn is None else learn)
    from .tower import Level, LR_COEFFICIENT
    for i, lv in enumerate(levels):
        if not isinstance(lv, Level):
            raise TypeError(f"tower level {i + 1} must be a hypergrad.Level, got {type(lv).__name__}")

    G = nx.DiGraph(type="tower", family=family.name, depth=len(levels))
    G.add_node("params", kind="params", label="x  (model parameters)")
    G.add_node("level0", kind="level", level=0, rule=family.name, lr=None,
               label=f"level 0: {family.name}\n(the model's optimizer)")
    G.add_edge("level0", "params", kind="updates", name="x")
    below = [("level0", n, LR_COEFFICIENT if n == "lr" else family.coefficients[n]) for n in learned]
    for k, lv in enumerate(levels, start=1):
        fixed = [f"{n}={v:g}" for n, v in lv.values.items()
                 if n != "lr" and n not in lv.learn and not isinstance(v, tuple)]
        G.add_node(f"level{k}", kind="level", level=k, rule=lv.family.name, lr=lv.lr,
                   label=f"level {k}: {lv.family.name}, lr={lv.lr:g}"
                         + ("\n" + ", ".join(fixed) if fixed else ""))
        for owner, name, coef in below:
            cid = f"{owner}.{name}"
            G.add_node(cid, kind="coefficient", label=name, level=int(owner[5:]), learnable=True,
                       domain=coef.domain.describe())
            G.add_edge(f"level{k}", cid, kind="learns", name=name)
            G.add_edge(cid, owner, kind="hyperparameter", name=name)
        below = [(f"level{k}", n, lv.coefficient(n)) for n in lv.learn]
    return G


# ----------------------------------------------------------------------------------- layout and drawing
# Sizes in inches: the axes are drawn 1 data unit = 1 inch, so labels never scale.
_CHAR_W = 0.068      # width of one character at fontsize 9
_BOLD_W = 0.078      # the same, bold
_BOX_PAD = 0.32      # box padding plus the gap between two neighbouring boxes
_LAYER_H = 0.62      # vertical distance between layers


def _layers(G) -> Dict[str, int]:
    """Layer of every node: longest path from the sources, then each node as late as its consumers allow.

    Recurrence edges are ignored (they point back to the previous step).
    """
    nx = _nx()
    H = nx.DiGraph()
    H.add_nodes_from(G.nodes)
    H.add_edges_from((u, v) for u, v, d in G.edges(data=True) if d.get("kind") != "recurrence")
    while not nx.is_directed_acyclic_graph(H):  # pragma: no cover - graphs here are acyclic
        H.remove_edge(*nx.find_cycle(H)[0][:2])
    topo = list(nx.topological_sort(H))
    layer: Dict[str, int] = {}
    for n in topo:
        layer[n] = max((layer[p] + 1 for p in H.predecessors(n)), default=0)
    for n in reversed(topo):  # as late as possible: shortens the edges of side branches
        succ = list(H.successors(n))
        if succ:
            layer[n] = min(layer[s] for s in succ) - 1
    low = min(layer.values(), default=0)
    return {n: l - low for n, l in layer.items()}, H


def _width(G, n) -> float:
    if n not in G:
        return 0.0  # a dummy node of a long edge
    d = G.nodes[n]
    lines = _label(d).split("\n")
    return max(len(line) for line in lines) * (_BOLD_W if _bold(d) else _CHAR_W)


def _bold(data) -> bool:
    return data.get("kind") in ("state", "output", "level", "combinator") and not data.get("pruned")


def layout(G) -> Tuple[Dict[str, Tuple[float, float]], Dict[Tuple[str, str], List[Tuple[float, float]]]]:
    """Layered (Sugiyama-style) coordinates, top to bottom, without graphviz.

    Returns ``(positions, bends)``: node positions in inches and, for each edge that spans several
    layers, the points it passes through (dummy nodes that took part in the ordering, so long edges
    run between the boxes instead of through them).
    """
    layer, H = _layers(G)
    # Long edges become chains of dummy nodes, one per crossed layer.
    chains: Dict[Tuple[str, str], List[str]] = {}
    above: Dict[str, List[str]] = {n: [] for n in H.nodes}
    below: Dict[str, List[str]] = {n: [] for n in H.nodes}
    for u, v in H.edges:
        path = [u] + [f"\0{u}\0{v}\0{i}" for i in range(1, layer[v] - layer[u])] + [v]
        for i in range(1, len(path) - 1):
            layer[path[i]] = layer[u] + i
            above[path[i]], below[path[i]] = [], []
        for a, b in zip(path, path[1:]):
            below[a].append(b)
            above[b].append(a)
        chains[(u, v)] = path[1:-1]
    rows: Dict[int, List[str]] = {}
    for n in layer:  # first-seen order: a depth-first walk of the expression, a good start
        rows.setdefault(layer[n], []).append(n)
    keys = sorted(rows)
    index = {n: i for row in rows.values() for i, n in enumerate(row)}

    def crossings() -> int:
        total = 0
        for k in keys[:-1]:
            edges = sorted((index[a], index[b]) for a in rows[k] for b in below[a])
            for i in range(len(edges)):
                for j in range(i + 1, len(edges)):
                    total += edges[i][1] > edges[j][1] and edges[i][0] != edges[j][0]
        return total

    best, best_rows = crossings(), {k: list(r) for k, r in rows.items()}
    for sweep in range(16):
        down = sweep % 2 == 0
        for k in (keys[1:] if down else reversed(keys[:-1])):
            row = rows[k]
            bary = {}
            for n in row:
                nb = above[n] if down else below[n]
                bary[n] = sum(index[m] for m in nb) / len(nb) if nb else index[n]
            row.sort(key=lambda n: (bary[n], index[n]))
            for i, n in enumerate(row):
                index[n] = i
        c = crossings()
        if c < best:
            best, best_rows = c, {k: list(r) for k, r in rows.items()}
    rows = best_rows

    # Horizontal coordinates: pull each node towards its neighbours, keeping boxes apart.
    x: Dict[str, float] = {}
    for k in keys:
        cursor = 0.0
        for i, n in enumerate(rows[k]):
            if i:
                cursor += (_width(G, rows[k][i - 1]) + _width(G, n)) / 2 + _BOX_PAD
            x[n] = cursor
    for it in range(24):
        down = it % 2 == 0
        for k in (keys if down else reversed(keys)):
            row = rows[k]
            want = []
            for n in row:
                nb = (above[n] + below[n]) if it >= 20 else (above[n] if down else below[n]) or (above[n] + below[n])
                want.append(sum(x[m] for m in nb) / len(nb) if nb else x[n])
            gaps = [(_width(G, a) + _width(G, b)) / 2 + (_BOX_PAD if (a in G and b in G) else 0.12)
                    for a, b in zip(row, row[1:])]
            # closest positions to `want` with the minimum gaps: forward/backward passes, averaged
            fwd = list(want)
            for i in range(1, len(row)):
                fwd[i] = max(fwd[i], fwd[i - 1] + gaps[i - 1])
            bwd = list(want)
            for i in range(len(row) - 2, -1, -1):
                bwd[i] = min(bwd[i], bwd[i + 1] - gaps[i])
            pos = [(a + b) / 2 for a, b in zip(fwd, bwd)]
            for i in range(1, len(row)):
                pos[i] = max(pos[i], pos[i - 1] + gaps[i - 1])
            for n, p in zip(row, pos):
                x[n] = p
    left = min(x[n] - _width(G, n) / 2 for n in x)
    dy = _LAYER_H * (1.45 if G.graph.get("type") == "tower" else 1.0)
    coords = {n: (x[n] - left, -layer[n] * dy) for n in layer}
    positions = {n: coords[n] for n in G.nodes}
    bends = {e: [coords[d] for d in ds] for e, ds in chains.items() if ds}
    return positions, bends


def _style(data) -> Dict[str, object]:
    kind = data.get("kind", "op")
    if kind == "coefficient" and data.get("learnable") is False:
        kind = "fixed coefficient"
    face = KIND_COLORS.get(kind, "#ffffff")
    style = dict(boxstyle="round,pad=0.3", facecolor=face, edgecolor="#555555", linewidth=0.8)
    if kind in ("combinator", "output", "level"):
        style["linewidth"] = 1.6
    if kind == "prev":
        style["linestyle"] = "--"
    if data.get("pruned"):
        style.update(facecolor=PRUNED_COLOR, edgecolor="#bbbbbb", linestyle=":")
    return style


def _label(data) -> str:
    label = str(data.get("label", ""))
    if data.get("_inputs", 0) >= 3 and len(label) < 7:  # room for three arrow heads and their labels
        label = label.center(7)
    if "fixed" in data:
        value = data["fixed"]
        label += " = " + (str(tuple(value)) if isinstance(value, (tuple, list)) else _fmt(float(value)))
    return label


def _legend_kinds(graphs) -> List[str]:
    kinds = []
    for G in graphs:
        for _, d in G.nodes(data=True):
            k = d.get("kind")
            if k == "coefficient" and d.get("learnable") is False:
                k = "fixed coefficient"
            if k not in kinds:
                kinds.append(k)
    order = list(KIND_COLORS)
    return sorted(kinds, key=lambda k: order.index(k) if k in order else len(order))


def draw(graph, path, title: Optional[str] = None, dpi: int = 120):
    """Lay out ``graph`` (or a list of graphs: one panel each, side by side) and write a PNG to ``path``.

    Colours by node kind (legend at the bottom); faded dotted boxes are the pruned nodes of a
    ``family_graph(..., at=...)``; dashed blue arcs are recurrences (a state's new value, read as
    the previous value at the next step); orange edges carry combinator weights (and, in a tower,
    what each level learns). A graph's ``graph.graph["title"]`` titles its panel. matplotlib is
    imported here, with the Agg canvas (no display needed). Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, Patch

    graphs = list(graph) if isinstance(graph, (list, tuple)) else [graph]
    if not graphs:
        raise ValueError("draw needs at least one graph")
    graphs = [G.copy() for G in graphs]  # the drawing annotates its own copies
    for G in graphs:
        for n in G.nodes:
            G.nodes[n]["_inputs"] = sum(1 for u in G.predecessors(n) if G.edges[u, n].get("kind") != "recurrence")
    layouts = [layout(G) for G in graphs]
    margin, head = 0.4, 0.55
    extents = []
    for G, (pos, bent) in zip(graphs, layouts):
        w = max([p[0] + _width(G, n) / 2 for n, p in pos.items()]
                + [p[0] for pts in bent.values() for p in pts]) + 0.2
        h = -min(p[1] for p in pos.values())
        title_w = len(G.graph.get("title") or _default_title(G)) * 0.075
        note = G.graph.get("note")
        if note:  # a note box sits at the top right of the panel, next to the drawing
            w += max(len(line) for line in note.split("\n")) * 0.072 + 0.5
        extents.append((max(w, title_w, 3.0), h))
    handles = [Patch(facecolor=KIND_COLORS.get(k, "#ffffff"), edgecolor="#555555", label=k)
               for k in _legend_kinds(graphs)]
    kinds = {d.get("kind") for G in graphs for _, _, d in G.edges(data=True)}
    if any(d.get("pruned") for G in graphs for _, d in G.nodes(data=True)):
        handles.append(Patch(facecolor=PRUNED_COLOR, edgecolor="#aaaaaa", linestyle=":", label="pruned"))
    if "recurrence" in kinds:
        handles.append(Line2D([], [], color="#2f6db5", linestyle=(0, (4, 3)), label="new value -> previous value"))
    if "weight" in kinds:
        handles.append(Line2D([], [], color="#d9822b", linewidth=1.2, label="combinator weight"))
    if "definition" in kinds:
        handles.append(Line2D([], [], color="#2f6db5", linewidth=1.3, label="defines a state"))
    if "learns" in kinds:
        handles.append(Line2D([], [], color="#d9822b", linewidth=1.6, label="learns"))
    fig_w = sum(w for w, _ in extents) + margin * (len(graphs) + 1)
    ncol = max(1, min(len(handles), int(fig_w // 1.9)))
    legend_h = 0.25 * math.ceil(len(handles) / ncol) + 0.3
    fig_h = max(h for _, h in extents) + 2 * margin + head + legend_h + (0.45 if title else 0.0)
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)
    left = margin
    top = fig_h - margin - head - (0.45 if title else 0.0)
    for G, (pos, bends), (w, h) in zip(graphs, layouts, extents):
        ax = fig.add_axes([left / fig_w, (top - h - 0.3) / fig_h, w / fig_w, (h + 0.6) / fig_h])
        ax.set_xlim(-0.1, w - 0.1)
        ax.set_ylim(-h - 0.3, 0.3)
        ax.set_axis_off()
        left += w + margin
        texts = {}
        for n, d in G.nodes(data=True):
            color = "#9a9a9a" if d.get("pruned") else "#111111"
            bold = _bold(d)
            texts[n] = ax.text(pos[n][0], pos[n][1], _label(d), ha="center", va="center", fontsize=9, color=color,
                               fontweight="bold" if bold else "normal", bbox=_style(d), zorder=3,
                               multialignment="center")
        fig.canvas.draw()  # places the text boxes, so that arrow heads stop at their edges
        # ports: the edges entering a box aim at points spread along its width, ordered by where
        # they come from, so that arrow heads and their a/b/w labels do not pile up
        port: Dict[Tuple[str, str], float] = {}
        for v in G.nodes:
            incoming = [(u, v) for u in G.predecessors(v) if G.edges[u, v].get("kind") != "recurrence"]
            incoming.sort(key=lambda e: (bends.get(e) or [pos[e[0]]])[-1][0])
            half = max(_width(G, v) / 2 - 0.04, 0.0) * (0.6 if G.graph.get("type") == "tower" else 1.0)
            for i, e in enumerate(incoming):
                port[e] = 0.0 if len(incoming) == 1 else -half + 2 * half * i / (len(incoming) - 1)
        for u, v, d in G.edges(data=True):
            kind = d.get("kind")
            faded = G.nodes[u].get("pruned") or G.nodes[v].get("pruned")
            color, style, lw = "#707070", "-", 0.9
            if kind == "recurrence":
                color, style, lw = "#2f6db5", (0, (4, 3)), 0.9
            elif kind in ("weight", "learns"):
                color, lw = "#d9822b", 1.2 if kind == "weight" else 1.6
            elif kind in ("definition", "updates"):
                color, lw = "#2f6db5", 1.3
            if faded:
                color, style, lw = "#d3d3d3", (0, (1, 2)), 0.9
            points = [pos[u]] + bends.get((u, v), []) + [(pos[v][0] + port.get((u, v), 0.0), pos[v][1])]
            if len(points) > 2:
                xs, ys = zip(*points[:-1])
                ax.plot(xs, ys, color=color, linestyle=style, linewidth=lw, zorder=1, solid_capstyle="round")
            rad = 0.0
            if kind == "recurrence":  # back to the top: an arc on the side of the box
                rad = -0.35 if pos[v][0] <= pos[u][0] else 0.35
            ax.add_patch(FancyArrowPatch(points[-2], points[-1], patchA=texts[u].get_bbox_patch() if len(points) == 2
                                         else None, patchB=texts[v].get_bbox_patch(), arrowstyle="-|>",
                                         mutation_scale=9, connectionstyle=f"arc3,rad={rad}", color=color,
                                         linestyle=style, linewidth=lw, shrinkA=0, shrinkB=1, zorder=2))
            role = d.get("role")
            if role in ("a", "b", "w") or (G.nodes[v].get("op") == "hull" and role != "definition"):
                (x0, y0), (x1, y1) = points[-2], points[-1]
                f = 1 - 0.42 * _LAYER_H / max(abs(y1 - y0), 1e-9) if abs(y1 - y0) > 0.1 else 0.5
                ax.text(x0 + f * (x1 - x0), y0 + f * (y1 - y0), role, fontsize=7, ha="center", va="center",
                        color="#9a9a9a" if faded else ("#b05f10" if kind == "weight" else "#333333"), zorder=4,
                        fontstyle="italic", bbox=dict(boxstyle="round,pad=0.06", facecolor="white", edgecolor="none"))
        ax.set_title(G.graph.get("title") or _default_title(G), fontsize=10, loc="left", pad=14)
        if G.graph.get("note"):
            ax.text(1.0, 1.0, G.graph["note"], transform=ax.transAxes, fontsize=8.5, ha="right", va="top",
                    color="#333333", linespacing=1.5, multialignment="left", family="monospace",
                    bbox=dict(boxstyle="round,pad=0.5", facecolor="#f7f7f7", edgecolor="#cccccc"))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 0.1 / fig_h))
    if title:
        fig.text(margin / fig_w, 1 - margin / fig_h, title, fontsize=13, va="top", fontweight="bold")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path


def _default_title(G) -> str:
    if G.graph.get("type") == "tower":
        return f"tower of depth {G.graph.get('depth')} over {G.graph.get('family')}"
    at = G.graph.get("at")
    if not at:
        return f"family {G.graph.get('family')!r}"
    where = f"its {at!r} vertex" if "=" not in at else at
    return f"family {G.graph.get('family')!r} at {where} (faded: pruned)"


# ----------------------------------------------------------------------------------- command
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write docs/images/{mada, mada_adam_vertex, tower}.png (or into the directory given)."""
    import argparse

    from optimizers import mada

    from .tower import Level

    parser = argparse.ArgumentParser(prog="python -m hypergrad.graph", description=main.__doc__)
    parser.add_argument("directory", nargs="?", default="docs/images")
    args = parser.parse_args(argv)
    out = Path(args.directory)
    family = mada()
    full = family_graph(family)
    full.graph["title"] = "MADA: inputs, coefficients, buffers (m_t new value, m_(t-1) previous) and the ops between"
    draw(full, out / "mada.png")
    overlay = family_graph(family, at="adam")
    pruned = pruned_names(overlay)
    overlay.graph["title"] = ("MADA at its Adam vertex (beta3=0, c=1, rho=1, gamma=1): faded nodes are pruned — "
                              f"buffers {', '.join(pruned['states'])}")
    vertex = family_graph(family.vertex("adam"))
    vertex.graph["title"] = (f"mada().vertex('adam'): what is left — buffers {', '.join(family.vertex('adam').state_names)}"
                             f", coefficients {', '.join(family.vertex('adam').coefficients)}")
    draw([overlay, vertex], out / "mada_adam_vertex.png")
    tower = tower_graph([family, Level("adam", lr=1e-3, learn=["lr"]),
                         Level("sgd", lr=1e-4, momentum=0.5, learn=["lr", "momentum"]), Level("sgd", lr=1e-5)])
    tower.graph["title"] = "Depth-3 tower: MADA <- Adam <- SGD <- SGD (each level learns the hyperparameters below it)"
    tower.graph["note"] = ("At step t, hypergradients climb one level per vjp:\n"
                           "  d1 = vjp_0(g_t)   (through the model's last update)\n"
                           "  d2 = vjp_1(d1)    (through level 1's last update)\n"
                           "  d3 = vjp_2(d2)\n"
                           "then updates run top-down: level 3 moves\n"
                           "(lr, momentum) of level 2, level 2 moves level 1's lr,\n"
                           "level 1 moves MADA's coefficients, MADA moves x.\n"
                           "Orange: learns. Each coefficient vector is\n"
                           "projected onto its domain after its step.")
    draw(tower, out / "tower.png")
    for name in ("mada.png", "mada_adam_vertex.png", "tower.png"):
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
