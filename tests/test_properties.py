"""Property-based tests (hypothesis) for the domains, the DSL combinators and argument validation.

Every property runs with ``derandomize=True``: the examples are a fixed function of the test, so a
run is reproducible and a failure shows the same counter-example every time.

* domains: ``project`` lands in the domain, is idempotent, is the identity on the domain and is
  the *Euclidean* projection (variational inequality <x - P(x), y - P(x)> <= 0 for every y in the
  domain; for the simplex also against an independent bisection reference);
* ``Coefficient.validate``: out-of-domain values and wrong types fail with the argument's name;
* the combinators evaluated through a ``Family``: ``interp``, ``hull``, ``ema``, and pruning at
  constant weights;
* one table of bad constructor calls over the public API, each naming the bad argument.

Each entry of the bad-call table was first written against the code as a failing case, then fixed.
"""
import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch import nn

import hypergrad as H
import optimizers as O

PROPS = settings(derandomize=True, max_examples=60, deadline=None)
FEW = settings(derandomize=True, max_examples=25, deadline=None)

finite = st.floats(allow_nan=False, allow_infinity=False)
moderate = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
names = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)


@st.composite
def intervals(draw):
    a, b = sorted((draw(moderate), draw(moderate)))
    high = draw(st.sampled_from([b, math.inf]))
    open_high = draw(st.booleans()) if high != a else False  # [a, a) would be empty
    return O.Interval(a, high, open_high=open_high)


@st.composite
def interval_and_member(draw):
    dom = draw(intervals())
    top = dom.high if math.isfinite(dom.high) else dom.low + 1e6
    x = draw(st.floats(min_value=dom.low, max_value=top, allow_nan=False))
    assume(dom.contains(x))  # excludes the open upper end
    return dom, x


# ----------------------------------------------------------------------------- Interval / Beta / Positive
@PROPS
@given(intervals(), finite)
def test_interval_projection_of_a_float(dom, x):
    p = dom.project(x)
    assert dom.contains(p)
    assert dom.project(p) == p
    assert p == (x if dom.contains(x) else p)
    # Euclidean projection onto an interval: the clamp, i.e. the closest admissible point
    assert p == min(max(x, dom.low), dom._top)


@PROPS
@given(intervals(), st.lists(finite, min_size=1, max_size=6))
def test_interval_projection_of_a_float64_tensor(dom, xs):
    x = torch.tensor(xs, dtype=torch.float64)
    p = dom.project(x)
    assert p.dtype == torch.float64 and p.shape == x.shape
    assert all(dom.contains(v) for v in p)
    assert torch.equal(dom.project(p), p)
    inside = torch.tensor([dom.contains(v) for v in xs])
    assert torch.equal(p[inside], x[inside])


@PROPS
@given(interval_and_member(), finite)
def test_interval_projection_is_the_closest_point(dom_y, x):
    """Variational inequality: (x - P x)(y - P x) <= 0 for every y of the domain."""
    dom, y = dom_y
    p = dom.project(x)
    assert (x - p) * (y - p) <= 1e-9 * max(1.0, abs(x), abs(y))
    assert dom.project(y) == y


@PROPS
@given(finite)
def test_beta_projection(x):
    beta = O.Beta()
    p = beta.project(x)
    assert 0.0 <= p < 1.0 and beta.contains(p)
    assert beta.project(p) == p
    pt = beta.project(torch.tensor(x, dtype=torch.float64))
    assert beta.contains(pt) and float(pt) == p


@PROPS
@given(finite, st.sampled_from([1e-30, 1e-12, 1e-3]))
def test_positive_projection(x, floor):
    pos = O.Positive(floor)
    p = pos.project(x)
    assert pos.contains(p) and p >= floor
    assert pos.project(p) == p
    if x >= floor:
        assert p == x  # the identity on [floor, inf); (0, floor) is moved to the documented floor
    for dtype in (torch.float64, torch.float32):
        if dtype == torch.float32 and abs(x) > 1e38:
            continue  # not representable in float32
        pt = pos.project(torch.tensor(x, dtype=torch.float64).to(dtype))
        assert pos.contains(pt), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_beta_projection_of_a_low_precision_tensor_stays_in_the_domain(dtype):
    beta = O.Beta()
    assert beta.contains(beta.project(torch.tensor(2.0, dtype=dtype)))


def test_positive_projection_of_a_float16_tensor_stays_positive():
    pos = O.Positive()
    assert pos.contains(pos.project(torch.tensor(-1.0, dtype=torch.float16)))


# ----------------------------------------------------------------------------- Simplex
vectors = st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), min_size=1, max_size=7)


def _bisection_projection(x: torch.Tensor) -> torch.Tensor:
    """Independent reference: P(x) = max(x - theta, 0) with theta solving sum max(x - theta, 0) = 1
    (monotone in theta), found by bisection: no sorting, no active-set bookkeeping."""
    lo, hi = float(x.min()) - 1.0, float(x.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(torch.clamp(x - mid, min=0).sum()) > 1.0:
            lo = mid
        else:
            hi = mid
    return torch.clamp(x - 0.5 * (lo + hi), min=0)


@PROPS
@given(vectors)
def test_simplex_projection_is_the_euclidean_projection(xs):
    x = torch.tensor(xs, dtype=torch.float64)
    k = x.numel()
    simplex = O.Simplex(k)
    p = simplex.project(x)
    scale = 1.0 + float(x.abs().max())
    # in the domain
    assert p.shape == x.shape and p.dtype == torch.float64
    assert simplex.contains(p)
    # KKT without a QP solver: the simplex is the hull of e_1..e_k, so <x - p, y - p> <= 0 for all y
    # in it holds iff it holds at every vertex
    r = x - p
    for j in range(k):
        e = torch.zeros(k, dtype=torch.float64)
        e[j] = 1.0
        assert float(r @ (e - p)) <= 1e-9 * scale
    # equal to the bisection reference
    torch.testing.assert_close(p, _bisection_projection(x), rtol=0, atol=1e-9 * scale)
    # idempotent
    torch.testing.assert_close(simplex.project(p), p, rtol=0, atol=1e-12)
    # lists and tuples are accepted and projected in float64
    torch.testing.assert_close(simplex.project(list(xs)), p, rtol=0, atol=0)


@PROPS
@given(st.lists(st.floats(min_value=0.0, max_value=1e3, allow_nan=False), min_size=1, max_size=7))
def test_simplex_projection_is_the_identity_on_the_simplex(ws):
    w = torch.tensor(ws, dtype=torch.float64)
    assume(float(w.sum()) > 1e-6)
    w = w / w.sum()
    simplex = O.Simplex(w.numel())
    assert simplex.contains(w)
    torch.testing.assert_close(simplex.project(w), w, rtol=0, atol=1e-12)


def test_simplex_projection_of_a_float32_tensor_is_in_the_simplex():
    simplex = O.Simplex(3)
    assert simplex.contains(simplex.project(torch.tensor([0.1, 0.2, 0.3])))


# ----------------------------------------------------------------------------- Coefficient.validate
@PROPS
@given(names, interval_and_member(), finite)
def test_validate_accepts_the_domain_and_rejects_the_rest_by_name(name, dom_member, x):
    assume(name.isidentifier())
    dom, member = dom_member
    coef = O.Coefficient(name, member, dom)
    assert coef.validate(member) == member
    assert coef.validate(torch.tensor(member, dtype=torch.float64)) is not None
    if dom.contains(x):
        assert coef.validate(x) == x
    else:
        with pytest.raises(ValueError, match=rf"'{name}'"):
            coef.validate(x)
        with pytest.raises(ValueError, match=r"\bmy_arg\b"):
            coef.validate(x, what="my_arg")


@PROPS
@given(names, st.one_of(st.text(max_size=3), st.none(), st.booleans(), st.lists(finite, max_size=2),
                        st.complex_numbers(allow_nan=False, allow_infinity=False)))
def test_validate_rejects_wrong_types_by_name(name, value):
    assume(name.isidentifier())
    coef = O.Coefficient(name, 0.5, O.Interval(0.0, 1.0))
    with pytest.raises(TypeError, match=rf"'{name}'"):
        coef.validate(value)


@FEW
@given(names, st.integers(min_value=2, max_value=5))
def test_validate_rejects_multi_element_tensors_by_name(name, n):
    assume(name.isidentifier())
    coef = O.Coefficient(name, 0.5, O.Interval(0.0, 1.0))
    with pytest.raises(TypeError, match=rf"'{name}'"):
        coef.validate(torch.full((n,), 0.5))


@PROPS
@given(st.lists(st.floats(min_value=-2.0, max_value=2.0, allow_nan=False), min_size=3, max_size=3))
def test_validate_simplex_coefficient(ws):
    coef = O.Coefficient("weights", (1 / 3, 1 / 3, 1 / 3), O.Simplex(3))
    w = torch.tensor(ws, dtype=torch.float64)
    if coef.domain.contains(w):
        coef.validate(w)
    else:
        with pytest.raises(ValueError, match="'weights'"):
            coef.validate(w)
    coef.validate(coef.domain.project(w))


# ----------------------------------------------------------------------------- combinators via a Family
def _tensor(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _interp_family():
    return O.Family("interp_test", [O.Coefficient("w", 0.5, O.Interval(0.0, 1.0))],
                    O.interp(O.grad, O.param, O.Coef("w")))


@PROPS
@given(unit, seeds, st.integers(min_value=1, max_value=50), st.booleans())
def test_interp_through_a_family(w, seed, n, as_tensor):
    fam = _interp_family()
    a, b = _tensor(seed, n), _tensor(seed + 1, n)
    wv = torch.tensor(w, dtype=torch.float64) if as_tensor else w
    direction, state = fam.update(a, {}, b, {"w": wv}, torch.tensor(1.0, dtype=torch.float64))
    assert state == {}
    torch.testing.assert_close(direction, w * a + (1 - w) * b, rtol=1e-14, atol=1e-14)
    # the end points are the branches exactly (w * a + 0 * b with b finite)
    for end, branch in ((1.0, a), (0.0, b)):
        d, _ = fam.update(a, {}, b, {"w": end}, 1.0)
        assert torch.equal(d, branch)


def _two_branch_family():
    """interp(m, n, w): m an EMA of g (coefficient beta), n a running sum of g^2 (no coefficient)."""
    m = O.ema_state("m", O.grad, O.Coef("beta"))
    n = O.State("n")
    n.define(n.prev + O.square(O.grad))
    return O.Family("two_branches", [O.Coefficient("beta", 0.9, O.Beta()),
                                     O.Coefficient("w", 0.5, O.Interval(0.0, 1.0))],
                    O.interp(m, n, O.Coef("w")))


@PROPS
@given(st.floats(min_value=0.0, max_value=0.999, allow_nan=False), seeds, st.integers(min_value=1, max_value=4))
def test_interp_vertices_prune_the_other_branch(beta, seed, steps):
    full = _two_branch_family()
    assert set(full.state_names) == {"m", "n"}
    at_a, at_b = full.at(w=1.0), full.at(w=0.0)
    assert at_a.state_names == ("m",) and set(at_a.coefficients) == {"beta"}
    assert at_b.state_names == ("n",) and set(at_b.coefficients) == set()  # beta only fed the pruned branch
    g = [_tensor(seed + i, 6) for i in range(steps)]
    sa, sb, s_full = at_a.init_state(g[0]), at_b.init_state(g[0]), full.init_state(g[0])
    m = torch.zeros(6, dtype=torch.float64)
    n = torch.zeros(6, dtype=torch.float64)
    for t, gt in enumerate(g, start=1):
        m = beta * m + (1 - beta) * gt
        n = n + gt * gt
        da, sa = at_a.update(gt, sa, None, {"beta": beta}, float(t))
        db, sb = at_b.update(gt, sb, None, {}, float(t))
        d1, s_full = full.update(gt, s_full, None, {"beta": beta, "w": 1.0}, float(t))
        assert torch.equal(da, m) and torch.equal(sa["m"], m)
        assert torch.equal(db, n) and torch.equal(sb["n"], n)
        assert torch.equal(d1, m)  # the unpruned family at w = 1 agrees with the vertex exactly
    assert O.interp(O.grad, O.param, 1.0) is O.grad and O.interp(O.grad, O.param, 0.0) is O.param


@st.composite
def simplex_weights(draw, k):
    raw = draw(st.lists(st.floats(min_value=0.0, max_value=1.0, allow_nan=False), min_size=k, max_size=k))
    if draw(st.booleans()):  # sometimes a vertex or an edge: zero weights
        raw = [r if draw(st.booleans()) else 0.0 for r in raw]
    total = sum(raw)
    assume(total > 1e-3)
    return tuple(r / total for r in raw)


@PROPS
@given(simplex_weights(3), seeds)
def test_hull_equals_the_weighted_sum(w, seed):
    g, x = _tensor(seed, 8), _tensor(seed + 1, 8)
    branches = [O.grad, O.param, O.grad * O.param]
    expected = w[0] * g + w[1] * x + w[2] * (g * x)
    # constant weights (folded into the expression) ...
    const = O.Family("hull_const", [], O.hull(branches, w))
    d_const, _ = const.update(g, {}, x, {}, 1.0)
    torch.testing.assert_close(d_const, expected, rtol=1e-13, atol=1e-13)
    # ... and a simplex coefficient given at run time
    declared = O.Coefficient("weights", (1 / 3, 1 / 3, 1 / 3), O.Simplex(3))
    fam = O.Family("hull_coef", [declared], O.hull(branches, O.Coef("weights")))
    d_coef, _ = fam.update(g, {}, x, {"weights": torch.tensor(w, dtype=torch.float64)}, 1.0)
    torch.testing.assert_close(d_coef, expected, rtol=1e-13, atol=1e-13)


@PROPS
@given(simplex_weights(3))
def test_hull_zero_weights_prune_their_buffers(w):
    states = [O.ema_state(f"s{i}", O.grad * (i + 1), 0.5) for i in range(3)]
    fam = O.Family("hull_states", [], O.hull(states, w))
    assert set(fam.state_names) == {f"s{i}" for i in range(3) if w[i] != 0.0}


@PROPS
@given(st.floats(min_value=0.0, max_value=0.9999, allow_nan=False), seeds, st.integers(min_value=1, max_value=6))
def test_ema_through_a_family(beta, seed, steps):
    s = O.ema_state("avg", O.grad, O.Coef("beta"))
    fam = O.Family("ema_test", [O.Coefficient("beta", 0.9, O.Beta())], s)
    state = fam.init_state(_tensor(seed, 5))
    ref = torch.zeros(5, dtype=torch.float64)
    for t in range(1, steps + 1):
        g = _tensor(seed + t, 5)
        ref = beta * ref + (1 - beta) * g
        d, state = fam.update(g, state, None, {"beta": torch.tensor(beta, dtype=torch.float64)}, float(t))
        torch.testing.assert_close(d, ref, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(state["avg"], ref, rtol=1e-14, atol=1e-14)
    # constant factors fold: beta = 0 is the value, beta = 1 the previous value
    assert O.ema(O.param, O.grad, 0.0) is O.grad
    assert O.ema(O.param, O.grad, 1.0) is O.param


# ----------------------------------------------------------------------------- constructors: bad calls
def _p():
    return [nn.Parameter(torch.zeros(3))]




BAD_CALLS = [
    # Interval(low, high, open_high)
    ("Interval-low-str", lambda: O.Interval("a", 1.0), r"\blow\b"),
    ("Interval-high-str", lambda: O.Interval(0.0, "b"), r"\bhigh\b"),
    ("Interval-low-nan", lambda: O.Interval(float("nan"), 1.0), r"\blow\b"),
    ("Interval-low-above-high", lambda: O.Interval(2.0, 1.0), r"\blow\b"),
    ("Interval-low-tensor", lambda: O.Interval(torch.tensor(0.0), 1.0), r"\blow\b"),
    pytest.param("Interval-empty", lambda: O.Interval(1.0, 1.0, open_high=True), r"\bhigh\b"),
    pytest.param("Interval-open_high-str", lambda: O.Interval(0.0, 1.0, open_high="yes"), r"\bopen_high\b"),
    # Positive(floor), Simplex(size, tolerance)
    pytest.param("Positive-floor-negative", lambda: O.Positive(-1.0), r"\bfloor\b"),
    pytest.param("Positive-floor-zero", lambda: O.Positive(0.0), r"\bfloor\b"),
    pytest.param("Positive-floor-str", lambda: O.Positive("x"), r"\bfloor\b"),
    ("Simplex-size-zero", lambda: O.Simplex(0), r"\bsize\b"),
    ("Simplex-size-float", lambda: O.Simplex(2.0), r"\bsize\b"),
    ("Simplex-size-negative", lambda: O.Simplex(-3), r"\bsize\b"),
    pytest.param("Simplex-size-bool", lambda: O.Simplex(True), r"\bsize\b"),
    pytest.param("Simplex-tolerance-negative", lambda: O.Simplex(3, tolerance=-1.0), r"\btolerance\b"),
    pytest.param("Simplex-tolerance-str", lambda: O.Simplex(3, tolerance="x"), r"\btolerance\b"),
    # Coefficient(name, init, domain, learnable, doc)
    ("Coefficient-name", lambda: O.Coefficient("1x", 0.5), r"\bname\b"),
    ("Coefficient-name-int", lambda: O.Coefficient(3, 0.5), r"\bname\b"),
    ("Coefficient-init-str", lambda: O.Coefficient("k", "0.5"), r"\binit\b"),
    ("Coefficient-init-outside", lambda: O.Coefficient("k", 2.0), r"\binit\b"),
    ("Coefficient-init-not-on-simplex", lambda: O.Coefficient("w", (0.5, 0.6), O.Simplex(2)), r"\binit\b"),
    pytest.param("Coefficient-domain-str", lambda: O.Coefficient("k", 0.5, "unit"), r"\bdomain\b"),
    pytest.param("Coefficient-learnable-str", lambda: O.Coefficient("k", 0.5, learnable="yes"), r"\blearnable\b"),
    # State(name, init, scalar, definition), Coef(name)
    ("State-name", lambda: O.State("a b"), r"\bname\b"),
    ("State-init-str", lambda: O.State("m", init="0"), r"\binit\b"),
    ("State-init-bool", lambda: O.State("m", init=True), r"\binit\b"),
    pytest.param("State-definition-str", lambda: O.State("m", definition="g"), r"\bdefinition\b"),
    ("Coef-name", lambda: O.Coef("1a"), r"\bname\b"),
    ("Coef-name-int", lambda: O.Coef(5), r"\bname\b"),
    # Family(name, coefficients, direction, vertices, weight_decay_mode, ...)
    ("Family-name-empty", lambda: O.Family("", [], O.grad), r"\bname\b"),
    ("Family-name-int", lambda: O.Family(3, [], O.grad), r"\bname\b"),
    ("Family-coefficient-str", lambda: O.Family("f", ["k"], O.grad), r"\bcoefficients\b"),
    ("Family-weight_decay_mode", lambda: O.Family("f", [], O.grad, weight_decay_mode="x"), r"\bweight_decay_mode\b"),
    ("Family-vertex-outside", lambda: O.Family("f", [O.Coefficient("k", 0.5)], O.Coef("k") * O.grad,
                                               vertices={"v": {"k": 3.0}}), r"\bvertex\b"),
    pytest.param("Family-direction-str", lambda: O.Family("f", [], "grad"), r"\bdirection\b"),
    pytest.param("Family-coefficients-int", lambda: O.Family("f", 5, O.grad), r"\bcoefficients\b"),
    # RuleOptimizer(params, family, lr, weight_decay, weight_decay_mode, fused, **coefficients)
    ("RuleOptimizer-family-int", lambda: O.RuleOptimizer(_p(), 5), r"\bfamily\b"),
    ("RuleOptimizer-fused-str", lambda: O.RuleOptimizer(_p(), "adam", fused="yes"), r"\bfused\b"),
    ("HyperOptimizer-fused-nadam", lambda: H.HyperOptimizer(_p(), "nadam", fused=True, learn=["beta1"]), r"\bfused\b"),
    ("RuleOptimizer-betas-short", lambda: O.RuleOptimizer(_p(), "adam", betas=(0.9,)), r"\bbetas\b"),
    ("RuleOptimizer-lr-vector", lambda: O.RuleOptimizer(_p(), "adam", lr=torch.tensor([1e-3, 1e-3])), r"\blr\b"),
    ("RuleOptimizer-weight_decay-str", lambda: O.RuleOptimizer(_p(), "adam", weight_decay="0"), r"\bweight_decay\b"),
    ("RuleOptimizer-group-lr", lambda: O.RuleOptimizer([{"params": _p(), "lr": -1.0}], "adam"), r"\blr\b"),
    pytest.param("RuleOptimizer-group-betas-short",
                 lambda: O.RuleOptimizer([{"params": _p(), "betas": (0.9,)}], "adam"), r"\bbetas\b"),
    # HyperOptimizer(params, family, lr, ..., learn, tower, share, warmup, clip_hypergrad, backend, hyper_dtype)
    ("HyperOptimizer-family-int", lambda: H.HyperOptimizer(_p(), 3), r"\bfamily\b"),
    ("HyperOptimizer-warmup-float", lambda: H.HyperOptimizer(_p(), "mada", warmup=1.5), r"\bwarmup\b"),
    ("HyperOptimizer-warmup-bool", lambda: H.HyperOptimizer(_p(), "mada", warmup=True), r"\bwarmup\b"),
    ("HyperOptimizer-clip-str", lambda: H.HyperOptimizer(_p(), "mada", clip_hypergrad="1"), r"\bclip_hypergrad\b"),
    ("HyperOptimizer-clip-inf", lambda: H.HyperOptimizer(_p(), "mada", clip_hypergrad=math.inf), r"\bclip_hypergrad\b"),
    ("HyperOptimizer-tower-str", lambda: H.HyperOptimizer(_p(), "mada", tower="adam"), r"\btower\b"),
    ("HyperOptimizer-tower-list-str", lambda: H.HyperOptimizer(_p(), "mada", tower=["adam"]), r"\btower\b"),
    ("HyperOptimizer-tower-empty", lambda: H.HyperOptimizer(_p(), "mada", tower=[]), r"\btower\b"),
    ("HyperOptimizer-tower-without-learn", lambda: H.HyperOptimizer(_p(), "mada", learn=[], tower=H.Level()),
     r"\blearn\b"),
    ("HyperOptimizer-learn-simplex", lambda: H.HyperOptimizer(_p(), O.Family(
        "hull3", [O.Coefficient("w", (0.5, 0.5), O.Simplex(2))], O.hull([O.grad, O.sign(O.grad)], O.Coef("w"))),
        learn=["w"]), r"\blearn\b"),
    pytest.param("HyperOptimizer-learn-int", lambda: H.HyperOptimizer(_p(), "mada", learn=5), r"\blearn\b"),
    pytest.param("HyperOptimizer-hyper_dtype-str", lambda: H.HyperOptimizer(_p(), "mada", hyper_dtype="float32"),
                 r"\bhyper_dtype\b"),
    pytest.param("HyperOptimizer-hyper_dtype-int", lambda: H.HyperOptimizer(_p(), "mada", hyper_dtype=torch.int64),
                 r"\bhyper_dtype\b"),
    # Level(rule, lr, learn, lr_scale, **coefficients)
    ("Level-rule-int", lambda: H.Level(5), r"\brule\b"),
    ("Level-rule-unknown", lambda: H.Level("adamax"), r"\brule\b"),
    ("Level-lr-str", lambda: H.Level("sgd", lr="1"), r"\blr\b"),
    ("Level-lr-nan", lambda: H.Level("sgd", lr=float("nan")), r"\blr\b"),
    ("Level-learn-unknown", lambda: H.Level("sgd", learn=["zeta"]), r"\blearn\b"),
    ("Level-lr_scale-negative", lambda: H.Level("sgd", lr_scale={"lr": -1.0}), r"\blr_scale\b"),
    ("Level-lr_scale-str", lambda: H.Level("sgd", lr_scale={"lr": "1"}), r"\blr_scale\b"),
    ("Level-coefficient-unknown", lambda: H.Level("sgd", zeta=1.0), r"\bzeta\b"),
    ("Level-coefficient-outside", lambda: H.Level("adam", beta1=1.5), r"\bbeta1\b"),
    pytest.param("Level-lr_scale-list", lambda: H.Level("sgd", lr_scale=[1.0]), r"\blr_scale\b"),
    pytest.param("Level-betas-short", lambda: H.Level("adam", betas=(0.9,)), r"\bbetas\b"),
    pytest.param("Level-learn-int", lambda: H.Level("sgd", learn=5), r"\blearn\b"),
    # build_optimizer(name, params, **kw) and the hypergrad conveniences
    ("build_optimizer-name-int", lambda: O.build_optimizer(5, _p()), r"\brule\b"),
    ("build_optimizer-coefficient", lambda: O.build_optimizer("adamw", _p(), beta1=2.0), r"\bbeta1\b"),
    ("build_optimizer-unknown-kwarg", lambda: O.build_optimizer("adamw", _p(), momentum=0.9), r"\bmomentum\b"),
    pytest.param("build_optimizer-nesterov-str", lambda: O.build_optimizer("sgd", _p(), nesterov="yes"),
                 r"\bnesterov\b"),
    ("MADA-lr", lambda: H.MADA(_p(), lr=-1.0), r"\blr\b"),
    ("HyperSGD-hyper_lr", lambda: H.HyperSGD(_p(), hyper_lr=-1.0), r"\blr\b"),
    ("HyperSGD-momentum", lambda: H.HyperSGD(_p(), momentum=1.5), r"\bmomentum\b"),
    ("HyperAdam-learn", lambda: H.HyperAdam(_p(), learn=["rho"]), r"\blearn\b"),
]


def _label(entry):
    return entry.values[0] if isinstance(entry, type(pytest.param(None))) else entry[0]


@pytest.mark.parametrize("label, call, argument", BAD_CALLS, ids=[_label(c) for c in BAD_CALLS])
def test_constructor_rejects_bad_argument_by_name(label, call, argument):
    with pytest.raises((TypeError, ValueError), match=argument):
        call()


def test_bad_call_table_covers_every_public_constructor():
    covered = {_label(c).split("-")[0] for c in BAD_CALLS}
    assert {"Interval", "Positive", "Simplex", "Coefficient", "State", "Coef", "Family", "RuleOptimizer",
            "HyperOptimizer", "Level", "build_optimizer", "MADA", "HyperSGD", "HyperAdam"} <= covered


def test_learned_beta_coefficient_stays_in_its_domain_in_float32():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = H.HyperOptimizer(model.parameters(), "adam", lr=1e-2, learn=["beta2"], tower=H.Level("sgd", lr=1e6))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        assert O.Beta().contains(opt.coefficients()["beta2"])
