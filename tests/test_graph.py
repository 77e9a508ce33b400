"""Pictures of families and towers (hypergrad/graph.py): the graphs say what the family says."""
import networkx as nx
import pytest
import torch

import hypergrad as H
import optimizers as O
from hypergrad.graph import pruned_names

MADA_COEFS = ("beta1", "beta2", "beta3", "c", "rho", "gamma")


def _names(G, *kinds):
    return sorted(d.get("name", d["label"]) for _, d in G.nodes(data=True) if d["kind"] in kinds)


def test_mada_graph_has_exactly_the_family_states_and_coefficients():
    family = O.mada()
    G = H.family_graph(family)
    assert isinstance(G, nx.DiGraph)
    assert _names(G, "state") == sorted(family.state_names)
    assert _names(G, "prev") == sorted(family.state_names)
    assert _names(G, "coefficient") == sorted(family.coefficients)
    assert _names(G, "input") == ["g", "t"]  # MADA never reads the parameter
    for name, coef in family.coefficients.items():
        node = G.nodes[f"coef:{name}"]
        assert node["learnable"] == coef.learnable and node["domain"] == coef.domain.describe()
    # combinators: the three interps of MADA (c, rho, gamma) and Lion's u = interp(m_(t-1), g, beta1_lion)
    weights = sorted(u for u, v, d in G.edges(data=True) if d["kind"] == "weight")
    assert weights == sorted(f"coef:{n}" for n in ("c", "rho", "gamma", "beta1_lion"))
    assert all(G.nodes[v]["kind"] == "combinator" for u, v, d in G.edges(data=True) if d["kind"] == "weight")


def test_recurrences_link_each_state_to_its_previous_value_and_the_rest_is_acyclic():
    G = H.family_graph(O.mada())
    rec = sorted((u, v) for u, v, d in G.edges(data=True) if d["kind"] == "recurrence")
    assert rec == sorted((f"state:{s}", f"prev:{s}") for s in O.mada().state_names)
    dag = G.edge_subgraph([(u, v) for u, v, d in G.edges(data=True) if d["kind"] != "recurrence"])
    assert nx.is_directed_acyclic_graph(dag)
    assert [n for n in dag if dag.out_degree(n) == 0 and n.startswith("op")] == []  # every op feeds something
    # the direction is reachable from every prev node: the buffers are read
    assert all(nx.has_path(dag, f"prev:{s}", "direction") for s in O.mada().state_names)


def test_adam_vertex_graph_is_pruned():
    vertex = O.mada().vertex("adam")
    G = H.family_graph(vertex)
    assert _names(G, "state") == ["m", "v_bar"]
    assert _names(G, "coefficient") == ["beta1", "beta2", "eps"]
    labels = " ".join(d["label"] for _, d in G.nodes(data=True))
    for gone in ("g_prev", "n_", "v_tilde", "lion", "beta3", "rho", "gamma", "interp", "sign"):
        assert gone not in labels, gone  # no Adan, AVGrad, Yogi or Lion nodes
    assert not any(d["kind"] == "combinator" for _, d in G.nodes(data=True))


@pytest.mark.parametrize("vertex", sorted(O.MADA_VERTICES))
def test_pruning_overlay_agrees_with_family_at(vertex):
    family = O.mada()
    G = H.family_graph(family, at=vertex)
    restricted = family.vertex(vertex)
    kept_states = sorted(d["name"] for _, d in G.nodes(data=True) if d["kind"] == "state" and d["carried_at"])
    kept_coefs = sorted(d["label"] for _, d in G.nodes(data=True) if d["kind"] == "coefficient" and not d["pruned"])
    assert kept_states == sorted(restricted.state_names)
    assert kept_coefs == sorted(restricted.coefficients)
    assert sorted(pruned_names(G)["states"]) == sorted(set(family.state_names) - set(restricted.state_names))
    for name, value in O.MADA_VERTICES[vertex].items():
        assert G.nodes[f"coef:{name}"]["fixed"] == value


def test_hull_is_one_combinator_node():
    w = O.Coef("w")
    a, b = O.State("a"), O.State("b")
    a.define(O.ema(a.prev, O.grad, 0.9))
    b.define(O.ema(b.prev, O.square(O.grad), 0.9))
    fam = O.Family("h", [O.Coefficient("w", (0.5, 0.3, 0.2), O.Simplex(3))], O.hull([a, b, O.sign(O.grad)], w))
    G = H.family_graph(fam)
    hulls = [n for n, d in G.nodes(data=True) if d.get("op") == "hull"]
    assert len(hulls) == 1 and G.nodes[hulls[0]]["kind"] == "combinator"
    assert sorted(d["role"] for _, _, d in G.in_edges(hulls[0], data=True)) == ["0", "1", "2", "w"]
    assert list(G.successors("coef:w")) == hulls  # the w[i] * e_i products are inside the hull node


def _depth3(model):
    return H.MADA(model.parameters(), lr=1e-2,
                  tower=[H.Level("adam", lr=1e-3, learn=["lr"]),
                         H.Level("sgd", lr=1e-4, momentum=0.5, learn=["lr", "momentum"]),
                         H.Level("sgd", lr=1e-5)])


def test_tower_graph_levels_and_learns_edges():
    opt = _depth3(torch.nn.Linear(3, 2))
    G = H.tower_graph(opt)
    levels = sorted(n for n, d in G.nodes(data=True) if d["kind"] == "level")
    assert levels == [f"level{k}" for k in range(len(opt.tower) + 1)]  # L + 1 levels
    learns = sorted((u, v, d["name"]) for u, v, d in G.edges(data=True) if d["kind"] == "learns")
    assert learns == sorted([("level1", f"level0.{n}", n) for n in MADA_COEFS]
                            + [("level2", "level1.lr", "lr"),
                               ("level3", "level2.lr", "lr"), ("level3", "level2.momentum", "momentum")])
    for u, v, name in learns:  # each learned coefficient feeds the level it belongs to
        assert G.has_edge(v, v.split(".")[0]) and G.edges[v, v.split(".")[0]]["kind"] == "hyperparameter"
    assert G.has_edge("level0", "params")
    assert nx.is_directed_acyclic_graph(G)
    # the same tower given as a list of levels
    G2 = H.tower_graph([O.mada(), *opt.tower])
    assert sorted(G2.edges) == sorted(G.edges)


def test_draw_writes_png(tmp_path):
    family = O.mada()
    out = H.draw(H.family_graph(family), tmp_path / "mada.png", title="MADA")
    two = H.draw([H.family_graph(family, at="adam"), H.family_graph(family.vertex("adam"))], tmp_path / "v.png")
    tower = H.draw(H.tower_graph(_depth3(torch.nn.Linear(3, 2))), tmp_path / "sub" / "tower.png")
    for path in (out, two, tower):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown vertex"):
        H.family_graph(O.mada(), at="sgd")
    with pytest.raises(ValueError, match="no coefficient"):
        H.family_graph(O.mada(), at={"beta9": 0.0})
    with pytest.raises(TypeError, match="Level"):
        H.tower_graph([O.mada(), "adam"])
