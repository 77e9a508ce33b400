"""optimizers: declare optimizer families as interpolations of update rules.

Public API:
    Coefficient, Interval, Positive, NonNegative, Simplex   -- coefficient declarations (domains.py)
    expression DSL: grad, param, step, Coef, State, interp, hull, ema, sqrt, sign, ... (expr.py)
    Family                                                  -- a declared family (family.py)
    sgd, adam, adamw, amsgrad, avgrad, yogi, adan, adan_original, lion, nadam, mada, RULES, get_rule
    RuleOptimizer, build_optimizer                          -- torch.optim adapter (adapter.py)
"""
from .domains import Beta, Coefficient, Domain, Interval, NonNegative, Positive, Simplex
from .expr import (Coef, Const, Expr, State, absolute, bias_correction, ema, first_step, grad, hull, interp,
                   maximum, param, sign, sqrt, square, step)
from .family import WEIGHT_DECAY_MODES, Family
from .rules import (MADA_VERTICES, RULES, adam, adamw, adan, adan_original, amsgrad, avgrad, ema_state, get_rule,
                    lion, mada, nadam, sgd, yogi, adaptive_direction)
from .fused import FusedKernel
from .adapter import RuleOptimizer, apply_update, build_optimizer, displacement, flatten, needs_param, unflatten_like

__all__ = [
    "Beta", "Coefficient", "Domain", "Interval", "NonNegative", "Positive", "Simplex",
    "Coef", "Const", "Expr", "State", "absolute", "bias_correction", "ema", "first_step", "grad", "hull", "interp",
    "maximum", "param", "sign", "sqrt", "square", "step",
    "Family", "WEIGHT_DECAY_MODES",
    "MADA_VERTICES", "RULES", "adam", "adamw", "adan", "adan_original", "amsgrad", "avgrad", "ema_state", "get_rule",
    "lion", "mada", "nadam", "sgd", "yogi", "adaptive_direction",
    "FusedKernel", "RuleOptimizer", "build_optimizer", "apply_update", "displacement", "flatten", "needs_param", "unflatten_like",
]
