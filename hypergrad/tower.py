"""Levels of a hyper-optimizer tower and the coefficient vectors they update.

A tower (Chandra et al. 2022, "Gradient Descent: The Ultimate Optimizer") is a list of
optimizers, each learning the hyperparameters of the one below:

    level 0: the model's family (e.g. MADA) updates x         with hyperparameters q1
    level 1: tower[0] (e.g. Adam) updates q1                   with hyperparameters q2
    level 2: tower[1] (e.g. SGD)  updates q2                   with hyperparameters q3
    ...
    level L: tower[L-1] updates qL with fixed hyperparameters (its ``learn`` is empty).

Every ``q_k`` is ONE 1-D tensor (``CoefficientLayout`` says which entry is which coefficient), so a
hyper-level is just a ``Family`` run on a vector, and the hypergradient of a level is one vjp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from optimizers import Family, NonNegative, get_rule
from optimizers.adapter import displacement, expand_betas
from optimizers.domains import Coefficient, Interval, Positive

__all__ = ["Level", "CoefficientLayout", "LR_COEFFICIENT", "level_update"]

# The learning rate as a coefficient (learnable at level 0 for Baydin-style hypergradient descent,
# and at every hyper-level of a tower).
LR_COEFFICIENT = Coefficient("lr", 1e-3, NonNegative(), learnable=False, doc="learning rate")


class Level:
    """One hyper-optimizer level of a tower.

    Args:
        rule: a registered rule name (``"sgd"``, ``"adam"``...) or a ``Family``.
        lr: the level's learning rate (the *hyper*-learning rate), >= 0.
        learn: which of this level's own hyperparameters (``"lr"``, ``"momentum"``, ``"beta1"``...)
            the next level learns; empty for the top level.
        lr_scale: per-coefficient multipliers of ``lr`` for the coefficients this level updates,
            e.g. ``{"gamma": 0.1}`` (per-coefficient hyper-learning rates). Names not listed use 1.
        **coefficients: the rule's coefficient values (``momentum=0.9``, ``beta1=0.9``...).
    """

    def __init__(self, rule: Union[str, Family] = "sgd", lr: float = 1e-3, learn: Sequence[str] = (),
                 lr_scale: Optional[Mapping[str, float]] = None, **coefficients):
        family = get_rule(rule) if isinstance(rule, str) else rule
        if not isinstance(family, Family):
            raise TypeError(f"Level rule must be a rule name or a Family, got {type(rule).__name__}")
        coefficients = expand_betas(coefficients, "Level betas")
        unknown = set(coefficients) - set(family.coefficients)
        if unknown:
            raise ValueError(f"unknown argument(s) {sorted(unknown)} for hyper-level rule {family.name!r}; "
                             f"its coefficients are {sorted(family.coefficients)}")
        LR_COEFFICIENT.validate(lr, what="Level lr")
        values = {**family.defaults(), **coefficients}
        for name, value in values.items():
            family.coefficients[name].validate(value, what=f"Level {name}")
        if isinstance(learn, str):
            learn = (learn,)
        if not isinstance(learn, (tuple, list)):
            raise TypeError(f"Level learn must be a name or a list of names, got {learn!r}")
        if lr_scale is not None and not isinstance(lr_scale, Mapping):
            raise TypeError(f"Level lr_scale must be a dict {{coefficient name: multiplier}}, got {lr_scale!r}")
        allowed = ("lr", *family.coefficients)
        bad = [n for n in learn if n not in allowed]
        if bad:
            raise ValueError(f"Level learn={list(learn)}: {bad} not among this level's hyperparameters {list(allowed)}")
        for name, scale in (lr_scale or {}).items():
            if isinstance(scale, bool) or not isinstance(scale, Real) or not (scale >= 0) or math.isinf(scale):
                raise ValueError(f"Level lr_scale[{name!r}] must be a finite number >= 0, got {scale!r}")
        self.family = family
        self.lr = float(lr)
        self.learn = tuple(dict.fromkeys(learn))
        self.lr_scale = dict(lr_scale or {})
        self.values: Dict[str, float] = {"lr": float(lr), **{k: v for k, v in values.items()}}

    def coefficient(self, name: str) -> Coefficient:
        return LR_COEFFICIENT if name == "lr" else self.family.coefficients[name]

    def __repr__(self):
        extra = "".join(f", {k}={v!r}" for k, v in self.values.items() if k != "lr")
        learn = f", learn={list(self.learn)}" if self.learn else ""
        return f"Level({self.family.name!r}, lr={self.lr!r}{extra}{learn})"


@dataclass
class CoefficientLayout:
    """Which entry of a coefficient vector is which coefficient of which set.

    ``sets`` copies of ``names`` laid out set-major: entry ``s * len(names) + i`` is coefficient
    ``names[i]`` of set ``s`` (one set globally, one per param group or one per tensor).
    """

    names: Tuple[str, ...]
    coefficients: Tuple[Coefficient, ...]
    sets: int = 1

    def __post_init__(self):
        self.names = tuple(self.names)
        self.position = {n: i for i, n in enumerate(self.names)}

    def __len__(self):
        return len(self.names) * self.sets

    def index(self, set_index: int, name: str) -> int:
        return set_index * len(self.names) + self.position[name]

    def bounds(self, dtype, device) -> Tuple[Tensor, Tensor]:
        """Lower/upper bounds of every entry, for the projection onto the domains."""
        lows, highs = [], []
        for c in self.coefficients:
            dom = c.domain
            if isinstance(dom, Interval):
                lows.append(dom.low)
                highs.append(dom.top(dtype))  # an open end rounds down in the vector's own dtype
            elif isinstance(dom, Positive):
                lows.append(max(dom.floor, torch.finfo(dtype).tiny))
                highs.append(math.inf)
            else:
                raise TypeError(f"coefficient {c.name!r}: learning a {type(dom).__name__} coefficient is not supported")
        lows = torch.tensor(lows * self.sets, dtype=dtype, device=device)
        highs = torch.tensor(highs * self.sets, dtype=dtype, device=device)
        return lows, highs


def level_update(family: Family, q: Tensor, g: Tensor, state: Mapping[str, Tensor], h: Mapping[str, object], t,
                 weight_decay_mode: str, lows: Tensor, highs: Tensor, scale: Optional[Tensor]):
    """One hyper-level step: ``q_new = Pi_D(q + scale * displacement)``; returns ``(q_new, new_state)``.

    The projection Pi_D onto the coefficients' domains is part of the differentiated function, so
    a coefficient held at a bound passes no hypergradient to the level above (clamp's derivative).
    """
    delta, new_state = displacement(family, g, state, q, h, t, weight_decay_mode)
    if scale is not None:
        delta = delta * scale
    return torch.clamp(q + delta, lows, highs), new_state
