"""The rule library: classic optimizers and MADA, each declared once with the DSL.

Every builder returns a ``Family``; ``docs/rules.md`` lists the equations and the convention of
each one (beta conventions differ between papers and packages). Names of buffers follow
``torch.optim`` where a torch counterpart exists (``exp_avg``, ``exp_avg_sq``...).
"""
from __future__ import annotations

import math
from typing import Callable, Dict

from . import expr as E
from .domains import Beta, Coefficient, Interval, Positive
from .expr import Coef, State, bias_correction, ema, grad, interp, sign, sqrt, square, step
from .family import Family

__all__ = [
    "sgd", "adam", "adamw", "amsgrad", "avgrad", "yogi", "adan", "adan_original", "lion", "nadam", "mada",
    "RULES", "get_rule",
]

# NAdam's momentum schedule mu_t = beta1 (1 - 0.5 * 0.96^(t * psi)) (Dozat 2016, as in torch.optim.NAdam).
NADAM_SCHEDULE_BASE = 0.96

_UNIT = Interval(0.0, 1.0)
_BETA = Beta()  # torch's 0 <= beta < 1 (beta = 1 zeroes a bias correction)


def _beta(name, init, learnable=True, domain=_BETA, doc=""):
    return Coefficient(name, init, domain, learnable=learnable, doc=doc)


def _eps(init=1e-8):
    return Coefficient("eps", init, Positive(), learnable=False, doc="added to the denominator, outside the sqrt")


def ema_state(name: str, value, beta, init: float = 0.0) -> State:
    """A buffer ``s_t = beta s_{t-1} + (1 - beta) value``."""
    s = State(name, init)
    return s.define(ema(s.prev, value, beta))


def adaptive_direction(numerator, second_moment, beta2, eps):
    """``numerator / (sqrt(v / (1 - beta2^t)) + eps)``: Adam's preconditioning, eps outside the sqrt.

    Built as ``numerator * r`` with the one reciprocal ``r = 1 / (sqrt(v / bc2) + eps)`` per element
    (the derivative of ``r`` reuses it, where that of a quotient divides twice more); ``v / bc2`` is
    ``v * (1 / bc2)`` with the scalar reciprocal hoisted (see ``expr.div``).
    """
    return numerator * E.reciprocal(sqrt(second_moment / bias_correction(beta2)) + eps)


# --------------------------------------------------------------------------------------- SGD
def sgd(nesterov: bool = False) -> Family:
    """torch.optim.SGD: ``b_1 = g_1``, ``b_t = mu b_{t-1} + (1 - tau) g_t``; ``d = g + mu b`` (nesterov) or ``b``.

    L2 weight decay (``g <- g + wd x``) as in torch. At ``momentum = 0`` (see ``RULES["sgd"]``)
    the buffer is pruned and ``d = g``.
    """
    momentum, dampening = Coef("momentum"), Coef("dampening")
    buf = State("momentum_buffer")
    buf.define(E.first_step(grad, momentum * buf.prev + (1 - dampening) * grad))
    direction = grad + momentum * buf if nesterov else buf
    return Family(
        "sgd_nesterov" if nesterov else "sgd",
        [Coefficient("momentum", 0.0, _UNIT, doc="heavy-ball momentum mu"),
         Coefficient("dampening", 0.0, _UNIT, learnable=False, doc="dampening tau")],
        direction,
        vertices={"plain": {"momentum": 0.0, "dampening": 0.0}},
        weight_decay_mode="l2",
        doc=sgd.__doc__,
    )


# --------------------------------------------------------------------------------------- Adam family
def adam() -> Family:
    """torch.optim.Adam: ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, ``d = (m/bc1)/(sqrt(v/bc2)+eps)``.

    L2 weight decay (torch's Adam); ``adamw`` is the same rule with decoupled decay.
    """
    b1, b2, eps = Coef("beta1"), Coef("beta2"), Coef("eps")
    m = ema_state("exp_avg", grad, b1)
    v = ema_state("exp_avg_sq", square(grad), b2)
    return Family("adam", [_beta("beta1", 0.9), _beta("beta2", 0.999), _eps()],
                  adaptive_direction(m / bias_correction(b1), v, b2, eps), weight_decay_mode="l2", doc=adam.__doc__)


def adamw() -> Family:
    """torch.optim.AdamW: Adam with decoupled weight decay ``x <- x (1 - lr wd)`` first."""
    return adam().with_weight_decay("decoupled", name="adamw")


def amsgrad() -> Family:
    """torch.optim.Adam(amsgrad=True): ``v_max = max(v_max, v)`` of the raw ``v``, then divided by bc2."""
    b1, b2, eps = Coef("beta1"), Coef("beta2"), Coef("eps")
    m = ema_state("exp_avg", grad, b1)
    v = ema_state("exp_avg_sq", square(grad), b2)
    vmax = State("max_exp_avg_sq")
    vmax.define(E.maximum(vmax.prev, v))
    return Family("amsgrad", [_beta("beta1", 0.9), _beta("beta2", 0.999), _eps()],
                  adaptive_direction(m / bias_correction(b1), vmax, b2, eps), weight_decay_mode="l2",
                  doc=amsgrad.__doc__)


def avgrad() -> Family:
    """AVGrad (MADA paper): ``v~_t = (v_t + (t-1) v~_{t-1}) / t`` replaces AMSGrad's max. Decoupled decay."""
    b1, b2, eps = Coef("beta1"), Coef("beta2"), Coef("eps")
    m = ema_state("exp_avg", grad, b1)
    v = ema_state("exp_avg_sq", square(grad), b2)
    vavg = State("avg_exp_avg_sq")
    vavg.define((v + (step - 1) * vavg.prev) / step)
    return Family("avgrad", [_beta("beta1", 0.9), _beta("beta2", 0.999), _eps()],
                  adaptive_direction(m / bias_correction(b1), vavg, b2, eps), doc=avgrad.__doc__)


def yogi(initial_accumulator: float = 1e-6) -> Family:
    """Yogi (Zaheer et al. 2018) in MADA's form: ``v = v - (1-b2) sign(v - g^2) g^2``, bias-corrected like Adam.

    Reference defaults: ``eps = 1e-3``, ``v_0 = 1e-6`` (``initial_accumulator``). Decoupled decay.
    """
    b1, b2, eps = Coef("beta1"), Coef("beta2"), Coef("eps")
    m = ema_state("exp_avg", grad, b1)
    g2 = square(grad)
    v = State("exp_avg_sq", initial_accumulator)
    v.define(ema(v.prev, v.prev + g2 * sign(g2 - v.prev), b2))
    return Family("yogi", [_beta("beta1", 0.9), _beta("beta2", 0.999), _eps(1e-3)],
                  adaptive_direction(m / bias_correction(b1), v, b2, eps), doc=yogi.__doc__)


def adan() -> Family:
    """Adan as written in MADA: ``n = b3 n + (1-b3)(g - g_prev)``, ``g^ = g + b3 (g - g_prev)``,
    ``v = b2 v + (1-b2) g^^2``, ``d = (m/bc1 + b3 n)/(sqrt(v/bc2) + eps)``; ``g_prev = 0`` at t = 1.

    Betas in MADA's (Adam-like) convention; decoupled decay.
    """
    b1, b2, b3, eps = Coef("beta1"), Coef("beta2"), Coef("beta3"), Coef("eps")
    g_prev = State("prev_grad", definition=grad)
    diff = grad - g_prev.prev
    m = ema_state("exp_avg", grad, b1)
    n = ema_state("exp_avg_diff", diff, b3)
    v = ema_state("exp_avg_sq", square(grad + b3 * diff), b2)
    return Family("adan", [_beta("beta1", 0.9), _beta("beta2", 0.999), _beta("beta3", 0.9), _eps()],
                  adaptive_direction(m / bias_correction(b1) + b3 * n, v, b2, eps), doc=adan.__doc__)


def adan_original() -> Family:
    """Adan (Xie et al.) in the sail-sg / pytorch-optimizer code convention, betas (0.98, 0.92, 0.99):

    ``diff = g - g_prev`` (0 at t = 1), ``m = b1 m + (1-b1) g``, ``n = b2 n + (1-b2) diff``,
    ``v = b3 v + (1-b3)(g + b2 diff)^2``, ``d = (m/bc1 + b2 n/bc2)/(sqrt(v/bc3) + eps)``.
    (The paper writes the complements: its beta_k is 1 - ours.) Proximal weight decay by default
    ``x <- (x - lr d)/(1 + lr wd)``, as the reference code's ``no_prox=False``.
    """
    b1, b2, b3, eps = Coef("beta1"), Coef("beta2"), Coef("beta3"), Coef("eps")
    g_prev = State("prev_grad", definition=grad)
    diff = E.first_step(0.0, grad - g_prev.prev)
    m = ema_state("exp_avg", grad, b1)
    n = ema_state("exp_avg_diff", diff, b2)
    v = ema_state("exp_avg_sq", square(grad + b2 * diff), b3)
    numerator = m / bias_correction(b1) + b2 * n / bias_correction(b2)
    return Family("adan_original", [_beta("beta1", 0.98), _beta("beta2", 0.92), _beta("beta3", 0.99), _eps()],
                  adaptive_direction(numerator, v, b3, eps), weight_decay_mode="proximal", doc=adan_original.__doc__)


# --------------------------------------------------------------------------------------- Lion, NAdam
def lion() -> Family:
    """Lion (Chen et al. 2023): ``d = sign(b1 m_{t-1} + (1-b1) g)``, then ``m = b2 m + (1-b2) g``. Decoupled decay.

    The sign uses the *old* momentum (the reference MADA code used the updated one; a bug).
    """
    b1, b2 = Coef("beta1"), Coef("beta2")
    m = ema_state("exp_avg", grad, b2)
    # m's new value appears nowhere in the direction; reading m.prev is what makes it a carried
    # buffer, and every carried buffer is updated each step.
    direction = sign(interp(m.prev, grad, b1))
    return Family("lion", [_beta("beta1", 0.9), _beta("beta2", 0.99)], direction, doc=lion.__doc__)


def nadam(momentum_decay_default: float = 4e-3) -> Family:
    """torch.optim.NAdam: ``mu_t = b1 (1 - 0.5 * 0.96^(t psi))``, ``P_t = prod mu``,
    ``d = (1-mu_t)/(1-P_t) g/D + mu_{t+1}/(1-P_t mu_{t+1}) m/D`` with ``D = sqrt(v/bc2) + eps``. L2 decay.
    """
    b1, b2, eps, psi = Coef("beta1"), Coef("beta2"), Coef("eps"), Coef("momentum_decay")

    def mu(t):
        return b1 * (1.0 - 0.5 * NADAM_SCHEDULE_BASE ** (t * psi))

    mu_t, mu_next = mu(step), mu(step + 1.0)
    mu_product = State("mu_product", init=1.0, scalar=True)
    mu_product.define(mu_product.prev * mu_t)
    m = ema_state("exp_avg", grad, b1)
    v = ema_state("exp_avg_sq", square(grad), b2)
    denom = sqrt(v / bias_correction(b2)) + eps
    direction = (1.0 - mu_t) / (1.0 - mu_product) * grad / denom + mu_next / (1.0 - mu_product * mu_next) * m / denom
    return Family("nadam", [_beta("beta1", 0.9), _beta("beta2", 0.999), _eps(),
                            Coefficient("momentum_decay", momentum_decay_default, Interval(0.0, math.inf), learnable=False,
                                        doc="psi of the momentum schedule")],
                  direction, weight_decay_mode="l2", doc=nadam.__doc__)


# --------------------------------------------------------------------------------------- MADA
MADA_VERTICES: Dict[str, Dict[str, float]] = {
    "adam": {"beta3": 0.0, "c": 1.0, "rho": 1.0, "gamma": 1.0},
    "avgrad": {"beta3": 0.0, "c": 1.0, "rho": 0.0, "gamma": 1.0},
    "yogi": {"beta3": 0.0, "c": 0.0, "rho": 1.0, "gamma": 1.0},
    "adan": {"c": 1.0, "rho": 1.0, "gamma": 1.0},
    "lion": {"gamma": 0.0},
}


def mada() -> Family:
    """MADA, the paper's final parameterization (design.md §2.2), coefficients q = (b1, b2, b3, c, rho, gamma)::

        m_t  = b1 m + (1-b1) g
        n_t  = b3 n + (1-b3)(g - g_prev)                    n_0 = 0, g_prev = 0 at t = 1
        mL_t = b2L mL + (1-b2L) g,  u_t = b1L mL_{t-1} + (1-b1L) g
        g^   = g + b3 (g - g_prev)
        g~2  = c g^^2 + (1-c)(v-_{t-1} + g^^2 sign(g^^2 - v-_{t-1}))       c=1 Adam, c=0 Yogi
        v-_t = b2 v- + (1-b2) g~2
        v~_t = (v-_t + (t-1) v~_{t-1}) / t                                 AVGrad average
        v_t  = rho v-_t + (1-rho) v~_t                                      rho=1 Adam, rho=0 AVGrad
        d_t  = gamma (m_t/bc1 + b3 n_t)/(sqrt(v_t/bc2) + eps) + (1-gamma) sign(u_t)

    Defaults are the reference GPT-2 run's initial values (b1, b2, b3, rho, c, gamma) =
    (0.9, 0.95, 0.0, 0.6, 1.0, 1.0); Lion's betas (0.95, 0.98) are fixed by default. Domains
    (projection after each hyper-step): b1 in [0, 0.999], b2 in [0.5, 0.9999], b3 in [0, 0.99],
    c, rho, gamma in [0, 1] — a little wider than the reference code's so that torch's default
    betas (0.9, 0.999) are admissible. Decoupled weight decay.
    """
    b1, b2, b3 = Coef("beta1"), Coef("beta2"), Coef("beta3")
    c, rho, gamma, eps = Coef("c"), Coef("rho"), Coef("gamma"), Coef("eps")
    b1L, b2L = Coef("beta1_lion"), Coef("beta2_lion")

    g_prev = State("g_prev", definition=grad)
    diff = grad - g_prev.prev
    m = ema_state("m", grad, b1)
    n = ema_state("n", diff, b3)
    lion_m = ema_state("lion_m", grad, b2L)
    u = interp(lion_m.prev, grad, b1L)
    g_hat2 = square(grad + b3 * diff)
    v_bar = State("v_bar")
    yogi_target = v_bar.prev + g_hat2 * sign(g_hat2 - v_bar.prev)
    v_bar.define(ema(v_bar.prev, interp(g_hat2, yogi_target, c), b2))
    v_tilde = State("v_tilde")
    v_tilde.define((v_bar + (step - 1) * v_tilde.prev) / step)
    v = interp(v_bar, v_tilde, rho)
    adaptive = adaptive_direction(m / bias_correction(b1) + b3 * n, v, b2, eps)
    direction = interp(adaptive, sign(u), gamma)
    return Family(
        "mada",
        [Coefficient("beta1", 0.9, Interval(0.0, 0.999), doc="first-moment EMA"),
         Coefficient("beta2", 0.95, Interval(0.5, 0.9999), doc="second-moment EMA"),
         Coefficient("beta3", 0.0, Interval(0.0, 0.99), doc="Adan gradient-difference weight"),
         Coefficient("c", 1.0, _UNIT, doc="Adam (1) <-> Yogi (0) second moment"),
         Coefficient("rho", 0.6, _UNIT, doc="Adam (1) <-> AVGrad (0) second moment"),
         Coefficient("gamma", 1.0, _UNIT, doc="adaptive (1) <-> Lion sign (0) direction"),
         Coefficient("beta1_lion", 0.95, _BETA, learnable=False, doc="Lion interpolation beta"),
         Coefficient("beta2_lion", 0.98, _BETA, learnable=False, doc="Lion momentum beta"),
         _eps()],
        direction,
        vertices=MADA_VERTICES,
        doc=mada.__doc__,
    )


RULES: Dict[str, Callable[[], Family]] = {
    "sgd": sgd,
    "sgd_nesterov": lambda: sgd(nesterov=True),
    "adam": adam,
    "adamw": adamw,
    "amsgrad": amsgrad,
    "avgrad": avgrad,
    "yogi": yogi,
    "adan": adan,
    "adan_original": adan_original,
    "lion": lion,
    "nadam": nadam,
    "mada": mada,
}


def get_rule(name: str) -> Family:
    """The family registered as ``name`` (see ``RULES``)."""
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; allowed: {sorted(RULES)}")
    return RULES[name]()
