"""Step-by-step parity of our rules with their references, in float64.

Three kinds of oracle:

1. the packages users would otherwise use: ``torch.optim`` (SGD, Adam, AdamW, AMSGrad, NAdam),
   ``lion_pytorch.Lion``, ``pytorch_optimizer.Adan``;
2. MADA's named vertices against the standalone rule of that vertex (pruning must not change
   the arithmetic);
3. slow per-tensor reference loops written straight from the formulas of design.md §2.1/§2.2
   (schedule_free style) for the rules no package implements in MADA's form: AVGrad, Yogi,
   Adan-as-in-MADA and full MADA at an interior point of the family.

Every comparison runs STEPS steps on a small model with several parameter tensors and asserts a
max abs difference <= TOL, and that the parameters really moved (a no-op would pass trivially).
The last tests show that the oracles can fail: small perturbations of a coefficient are detected.
"""
import math

import lion_pytorch
import pytest
import pytorch_optimizer
import torch

import optimizers as O

STEPS = 25
TOL = 1e-10
LR = 1e-2
WD = 0.1


@pytest.fixture
def float64_default():
    """torch keeps NAdam's mu_product in the default dtype: compare in a float64 world, then restore."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def run_pair(helpers, make_ref, make_ours, steps=STEPS):
    """Train two identical models, one per optimizer; return (max abs diff, how far the reference moved)."""
    batch = helpers.make_batch()
    start = helpers.make_model()
    ref_model, our_model = helpers.make_model(), helpers.make_model()
    helpers.train(ref_model, make_ref(ref_model.parameters()), batch, steps)
    helpers.train(our_model, make_ours(our_model.parameters()), batch, steps)
    return helpers.max_diff(ref_model, our_model), helpers.max_diff(ref_model, start)


def assert_parity(helpers, make_ref, make_ours, steps=STEPS):
    diff, moved = run_pair(helpers, make_ref, make_ours, steps)
    assert moved > 1e-3, f"reference barely moved ({moved:.2e}); the comparison would be vacuous"
    assert diff <= TOL, f"max abs diff {diff:.3e} > {TOL}"


# ------------------------------------------------------------------------------ 1. package references
def _case(id, ref, ours, f64_default=False):
    return pytest.param(ref, ours, f64_default, id=id)


PACKAGE_CASES = [
    # SGD: every torch switch, through build_optimizer (which picks the plain / nesterov rule).
    _case("sgd_plain", lambda p: torch.optim.SGD(p, lr=0.1),
          lambda p: O.build_optimizer("sgd", p, lr=0.1)),
    _case("sgd_plain_wd", lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=WD),
          lambda p: O.build_optimizer("sgd", p, lr=0.1, weight_decay=WD)),
    _case("sgd_momentum", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
          lambda p: O.build_optimizer("sgd", p, lr=0.05, momentum=0.9)),
    _case("sgd_dampening", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3),
          lambda p: O.build_optimizer("sgd", p, lr=0.05, momentum=0.8, dampening=0.3)),
    _case("sgd_momentum_dampening_wd",
          lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.7, dampening=0.2, weight_decay=WD),
          lambda p: O.build_optimizer("sgd", p, lr=0.05, momentum=0.7, dampening=0.2, weight_decay=WD)),
    _case("sgd_nesterov", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
          lambda p: O.build_optimizer("sgd", p, lr=0.05, momentum=0.9, nesterov=True)),
    _case("sgd_nesterov_wd", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=WD),
          lambda p: O.RuleOptimizer(p, O.sgd(nesterov=True), lr=0.05, momentum=0.9, weight_decay=WD)),
    # Adam family: non-default betas and eps so that every coefficient is really passed through.
    _case("adam_l2", lambda p: torch.optim.Adam(p, lr=LR, betas=(0.85, 0.99), eps=1e-7, weight_decay=WD),
          lambda p: O.build_optimizer("adam", p, lr=LR, betas=(0.85, 0.99), eps=1e-7, weight_decay=WD)),
    _case("adam_defaults", lambda p: torch.optim.Adam(p, lr=LR),
          lambda p: O.RuleOptimizer(p, O.adam(), lr=LR)),
    _case("adamw", lambda p: torch.optim.AdamW(p, lr=LR, betas=(0.8, 0.98), weight_decay=WD),
          lambda p: O.build_optimizer("adamw", p, lr=LR, beta1=0.8, beta2=0.98, weight_decay=WD)),
    _case("amsgrad", lambda p: torch.optim.Adam(p, lr=LR, betas=(0.9, 0.95), amsgrad=True),
          lambda p: O.build_optimizer("amsgrad", p, lr=LR, betas=(0.9, 0.95))),
    _case("amsgrad_l2", lambda p: torch.optim.Adam(p, lr=LR, amsgrad=True, weight_decay=WD),
          lambda p: O.build_optimizer("amsgrad", p, lr=LR, weight_decay=WD)),
    _case("nadam_wd", lambda p: torch.optim.NAdam(p, lr=LR, betas=(0.85, 0.99), weight_decay=WD, momentum_decay=5e-3),
          lambda p: O.build_optimizer("nadam", p, lr=LR, betas=(0.85, 0.99), weight_decay=WD, momentum_decay=5e-3),
          f64_default=True),
    # MADA at its Adam vertex is AdamW (decoupled decay); beta2 passed because MADA's default is 0.95.
    _case("mada_adam_vertex_vs_adamw", lambda p: torch.optim.AdamW(p, lr=LR, betas=(0.9, 0.999), weight_decay=WD),
          lambda p: O.RuleOptimizer(p, O.mada().vertex("adam"), lr=LR, beta1=0.9, beta2=0.999, weight_decay=WD)),
    # ... and so is the unpruned family evaluated at the Adam point (interp weights 0/1 as values).
    _case("mada_full_at_adam_point_vs_adamw",
          lambda p: torch.optim.AdamW(p, lr=LR, betas=(0.9, 0.999), weight_decay=WD),
          lambda p: O.RuleOptimizer(p, O.mada(), lr=LR, beta1=0.9, beta2=0.999, beta3=0.0, c=1.0, rho=1.0,
                                    gamma=1.0, weight_decay=WD)),
    # Lion: decoupled decay x <- x (1 - lr wd), sign of the old momentum. A sign only notices a
    # wrong momentum where it flips: lr 1e-2 makes the run oscillate enough (at 1e-3 with betas
    # (0.9, 0.99), Lion built from the *updated* momentum matched lion_pytorch for 25 steps).
    _case("lion_wd", lambda p: lion_pytorch.Lion(p, lr=1e-2, betas=(0.9, 0.99), weight_decay=WD),
          lambda p: O.build_optimizer("lion", p, lr=1e-2, betas=(0.9, 0.99), weight_decay=WD)),
    _case("lion_betas", lambda p: lion_pytorch.Lion(p, lr=1e-2, betas=(0.95, 0.98), weight_decay=0.3),
          lambda p: O.build_optimizer("lion", p, lr=1e-2, beta1=0.95, beta2=0.98, weight_decay=0.3)),
    # Original Adan (sail-sg betas), proximal and decoupled decay.
    _case("adan_original_proximal",
          lambda p: pytorch_optimizer.Adan(p, lr=LR, betas=(0.98, 0.92, 0.99), weight_decay=WD,
                                           weight_decouple=False, foreach=False),
          lambda p: O.build_optimizer("adan_original", p, lr=LR, weight_decay=WD)),
    _case("adan_original_decoupled",
          lambda p: pytorch_optimizer.Adan(p, lr=LR, betas=(0.9, 0.8, 0.95), weight_decay=WD,
                                           weight_decouple=True, foreach=False),
          lambda p: O.build_optimizer("adan_original", p, lr=LR, beta1=0.9, beta2=0.8, beta3=0.95, weight_decay=WD,
                                      weight_decay_mode="decoupled")),
]


@pytest.mark.parametrize("make_ref, make_ours, f64_default", PACKAGE_CASES)
def test_matches_package_reference(helpers, make_ref, make_ours, f64_default, request):
    if f64_default:
        request.getfixturevalue("float64_default")
    assert_parity(helpers, make_ref, make_ours)


# ------------------------------------------------------------------------------ 2. MADA vertices
VERTEX_CASES = [
    # vertex name, standalone family, coefficients for the vertex, coefficients for the standalone rule
    pytest.param("adam", O.adamw, dict(beta1=0.85, beta2=0.99, eps=1e-7), dict(beta1=0.85, beta2=0.99, eps=1e-7),
                 id="adam"),
    pytest.param("avgrad", O.avgrad, dict(beta1=0.85, beta2=0.9), dict(beta1=0.85, beta2=0.9), id="avgrad"),
    pytest.param("yogi", lambda: O.yogi(initial_accumulator=0.0), dict(beta1=0.9, beta2=0.95, eps=1e-3),
                 dict(beta1=0.9, beta2=0.95, eps=1e-3), id="yogi"),
    pytest.param("adan", O.adan, dict(beta1=0.9, beta2=0.97, beta3=0.6), dict(beta1=0.9, beta2=0.97, beta3=0.6),
                 id="adan"),
    pytest.param("lion", O.lion, dict(beta1_lion=0.9, beta2_lion=0.99), dict(beta1=0.9, beta2=0.99), id="lion"),
]


@pytest.mark.parametrize("vertex, standalone, vertex_kw, standalone_kw", VERTEX_CASES)
def test_mada_vertex_matches_standalone_rule(helpers, vertex, standalone, vertex_kw, standalone_kw):
    family = O.mada().vertex(vertex)
    assert set(family.coefficients) == set(vertex_kw) | ({"eps"} if vertex != "lion" else set())
    assert_parity(helpers,
                  lambda p: O.RuleOptimizer(p, standalone(), lr=LR, weight_decay=WD, **standalone_kw),
                  lambda p: O.RuleOptimizer(p, family, lr=LR, weight_decay=WD, **vertex_kw))


# ------------------------------------------------------------------------------ 3. formula oracles
class Reference(torch.optim.Optimizer):
    """A slow reference: a Python loop over tensors running ``rule`` from the formulas, decoupled decay.

    ``rule(g, x, s, t, **coefficients)`` reads and writes the per-tensor state dict ``s`` (buffers
    created from ``init`` on first use) and returns the direction d with x <- x(1 - lr wd) - lr d.
    """

    def __init__(self, params, rule, lr, weight_decay=0.0, init=None, **coefficients):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.rule, self.init, self.coefficients = rule, dict(init or {}), coefficients

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for x in group["params"]:
                if x.grad is None:
                    continue
                s = self.state[x]
                if not s:
                    s["t"] = 0
                    for name, value in self.init.items():
                        s[name] = torch.full_like(x, value)
                s["t"] += 1
                d = self.rule(x.grad.clone(), x.detach().clone(), s, s["t"], **self.coefficients)
                x.mul_(1 - group["lr"] * group["weight_decay"])
                x.sub_(group["lr"] * d)


def ref_avgrad(g, x, s, t, beta1, beta2, eps):
    """design.md §2.1 AVGrad: Adam with v replaced by its running average v~_t = (v_t + (t-1) v~_{t-1}) / t."""
    s["m"] = beta1 * s["m"] + (1 - beta1) * g
    s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
    s["v_avg"] = (s["v"] + (t - 1) * s["v_avg"]) / t
    return (s["m"] / (1 - beta1 ** t)) / (torch.sqrt(s["v_avg"] / (1 - beta2 ** t)) + eps)


def ref_yogi(g, x, s, t, beta1, beta2, eps):
    """design.md §2.1 Yogi (Zaheer et al.): v = v - (1 - beta2) sign(v - g^2) g^2, bias-corrected as Adam."""
    s["m"] = beta1 * s["m"] + (1 - beta1) * g
    g2 = g * g
    s["v"] = s["v"] - (1 - beta2) * torch.sign(s["v"] - g2) * g2
    return (s["m"] / (1 - beta1 ** t)) / (torch.sqrt(s["v"] / (1 - beta2 ** t)) + eps)


def ref_adan_mada(g, x, s, t, beta1, beta2, beta3, eps):
    """design.md §2.1 Adan as in MADA: g_prev = 0 at t = 1; g^ = g + b3 (g - g_prev); d = (m/bc1 + b3 n)/(...)."""
    diff = g - s["g_prev"]
    s["m"] = beta1 * s["m"] + (1 - beta1) * g
    s["n"] = beta3 * s["n"] + (1 - beta3) * diff
    g_hat = g + beta3 * diff
    s["v"] = beta2 * s["v"] + (1 - beta2) * g_hat * g_hat
    s["g_prev"] = g
    return (s["m"] / (1 - beta1 ** t) + beta3 * s["n"]) / (torch.sqrt(s["v"] / (1 - beta2 ** t)) + eps)


def ref_mada(g, x, s, t, beta1, beta2, beta3, c, rho, gamma, beta1_lion, beta2_lion, eps):
    """design.md §2.2, line by line."""
    diff = g - s["g_prev"]
    s["m"] = beta1 * s["m"] + (1 - beta1) * g
    s["n"] = beta3 * s["n"] + (1 - beta3) * diff
    u = beta1_lion * s["mL"] + (1 - beta1_lion) * g          # Lion reads the OLD momentum
    s["mL"] = beta2_lion * s["mL"] + (1 - beta2_lion) * g
    g_hat2 = (g + beta3 * diff) ** 2
    g_tilde2 = c * g_hat2 + (1 - c) * (s["v_bar"] + g_hat2 * torch.sign(g_hat2 - s["v_bar"]))
    s["v_bar"] = beta2 * s["v_bar"] + (1 - beta2) * g_tilde2
    s["v_tilde"] = (s["v_bar"] + (t - 1) * s["v_tilde"]) / t
    v = rho * s["v_bar"] + (1 - rho) * s["v_tilde"]
    s["g_prev"] = g
    adaptive = (s["m"] / (1 - beta1 ** t) + beta3 * s["n"]) / (torch.sqrt(v / (1 - beta2 ** t)) + eps)
    return gamma * adaptive + (1 - gamma) * torch.sign(u)


_ZEROS = lambda *names: {n: 0.0 for n in names}  # noqa: E731
MADA_INTERIOR = dict(beta1=0.85, beta2=0.97, beta3=0.3, c=0.4, rho=0.6, gamma=0.7, beta1_lion=0.9, beta2_lion=0.99,
                     eps=1e-8)

ORACLE_CASES = [
    # id, our family, reference rule, reference buffers' initial values, coefficients
    pytest.param(O.avgrad, ref_avgrad, _ZEROS("m", "v", "v_avg"), dict(beta1=0.85, beta2=0.9, eps=1e-8),
                 id="avgrad"),
    pytest.param(lambda: O.mada().vertex("avgrad"), ref_avgrad, _ZEROS("m", "v", "v_avg"),
                 dict(beta1=0.85, beta2=0.9, eps=1e-8), id="mada_vertex_avgrad"),
    pytest.param(O.yogi, ref_yogi, {"m": 0.0, "v": 1e-6}, dict(beta1=0.9, beta2=0.95, eps=1e-3),
                 id="yogi_v0_1e-6"),
    pytest.param(lambda: O.yogi(initial_accumulator=0.0), ref_yogi, _ZEROS("m", "v"),
                 dict(beta1=0.9, beta2=0.95, eps=1e-3), id="yogi_v0_0"),
    pytest.param(lambda: O.mada().vertex("yogi"), ref_yogi, _ZEROS("m", "v"), dict(beta1=0.9, beta2=0.95, eps=1e-3),
                 id="mada_vertex_yogi"),
    pytest.param(O.adan, ref_adan_mada, _ZEROS("m", "n", "v", "g_prev"),
                 dict(beta1=0.9, beta2=0.97, beta3=0.6, eps=1e-8), id="adan_mada_form"),
    pytest.param(lambda: O.mada().vertex("adan"), ref_adan_mada, _ZEROS("m", "n", "v", "g_prev"),
                 dict(beta1=0.9, beta2=0.97, beta3=0.6, eps=1e-8), id="mada_vertex_adan"),
    pytest.param(O.mada, ref_mada, _ZEROS("m", "n", "mL", "v_bar", "v_tilde", "g_prev"), MADA_INTERIOR,
                 id="mada_interior"),
]


@pytest.mark.parametrize("family, rule, init, coefficients", ORACLE_CASES)
def test_matches_formula_oracle(helpers, family, rule, init, coefficients):
    assert_parity(helpers,
                  lambda p: Reference(p, rule, lr=LR, weight_decay=WD, init=init, **coefficients),
                  lambda p: O.RuleOptimizer(p, family(), lr=LR, weight_decay=WD, **coefficients))


def heavy_ball_in_x():
    """A user-declared family that stores the parameter itself: d = g - k (x_{t-1} - x_{t-2}), d_1 = g."""
    k = O.Coef("k")
    x_prev = O.State("x_prev", definition=O.param)
    direction = O.grad - O.first_step(0.0, k * (O.param - x_prev.prev))
    return O.Family("heavy_ball_in_x", [O.Coefficient("k", 0.5, O.Interval(0.0, 10.0))], direction)


def ref_heavy_ball_in_x(g, x, s, t, k):
    d = g if t == 1 else g - k * (x - s["x_prev"])
    s["x_prev"] = x
    return d


@pytest.mark.parametrize("group_per_tensor", [False, True], ids=["one_group", "group_per_tensor"])
def test_family_reading_the_parameter_matches_oracle(helpers, group_per_tensor):
    """A buffer defined as the parameter must hold x_{t-1}, not alias the tensor updated in place
    (single-tensor buckets are where a flat view would be the parameter itself)."""
    def ours(params):
        params = list(params)
        return O.RuleOptimizer([{"params": [p]} for p in params] if group_per_tensor else params,
                               heavy_ball_in_x(), lr=0.05, k=0.7, weight_decay=WD)
    assert_parity(helpers, lambda p: Reference(p, ref_heavy_ball_in_x, lr=0.05, weight_decay=WD, k=0.7), ours)


# ------------------------------------------------------------------------------ the oracles can fail
def test_oracle_detects_a_small_coefficient_change(helpers):
    """Our Adam with beta2 off by 1e-4 must be told apart from torch's (the TOL above is meaningful)."""
    diff, _ = run_pair(helpers, lambda p: torch.optim.Adam(p, lr=LR, betas=(0.9, 0.999)),
                       lambda p: O.RuleOptimizer(p, O.adam(), lr=LR, beta1=0.9, beta2=0.999 + 1e-4))
    assert diff > 1e-6


@pytest.mark.parametrize("name", [*MADA_INTERIOR, "lr", "weight_decay"])
def test_mada_oracle_sees_every_coefficient(helpers, name):
    """At the interior point every coefficient (and lr, weight decay) changes the trajectory: a 1e-3
    relative change of any one of them (eps, tiny next to sqrt(v): 10x) breaks parity with the
    formula oracle by far more than TOL."""
    ours = dict(MADA_INTERIOR, lr=LR, weight_decay=WD)
    ours[name] *= 10 if name == "eps" else 1 + 1e-3
    diff, _ = run_pair(helpers,
                       lambda p: Reference(p, ref_mada, lr=LR, weight_decay=WD,
                                           init=_ZEROS("m", "n", "mL", "v_bar", "v_tilde", "g_prev"),
                                           **MADA_INTERIOR),
                       lambda p: O.RuleOptimizer(p, O.mada(), **ours))
    assert diff > 1e3 * TOL, f"perturbing {name} changed the result by only {diff:.2e}"
    assert math.isfinite(diff)
