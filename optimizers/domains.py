"""Coefficient declarations and the domains they live in.

A coefficient is a named scalar hyperparameter of an update rule (``beta1``, ``rho``, ``gamma``,
``eps``...). It declares

* a **domain**: the set of values it may take. User-supplied values outside the domain are an
  error (never clamped); the hyper-gradient engine *projects* its own iterates onto the domain
  after every hyper-step, which is the Euclidean projection Π_D of MADA's Algorithm 1;
* an **initial value** (the default when the user passes none);
* a **learnable** flag: whether the hyper-gradient engine learns it by default.

Domains are deliberately tiny value objects: ``contains`` for validation and ``project`` for
projected hyper-gradient descent. Both work on Python floats and on tensors (``project`` of a
tensor is differentiable-free ``torch.clamp`` / simplex projection, no ``.data`` writes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Union

import torch

__all__ = ["Domain", "Interval", "Positive", "NonNegative", "Beta", "Simplex", "Coefficient"]

Number = Union[float, int]


class Domain:
    """Base class: a closed convex set of admissible values."""

    def contains(self, value) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def project(self, value):  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


def _as_float_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(float(value))


def _real_scalar(value) -> float | None:
    """``value`` as a Python float when it is one real number (a one-element tensor or a real that is
    not a bool), else None: what a scalar domain's ``contains`` can accept at all."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = float(value.detach())
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    return float(value)


@dataclass(frozen=True)
class Interval(Domain):
    """The interval ``[low, high]``, or ``[low, high)`` with ``open_high=True`` (``high`` may be inf).

    ``project(x) = min(max(x, low), high)``; for an open upper end the largest float below ``high``.
    """

    low: float
    high: float = math.inf
    open_high: bool = False

    def __post_init__(self):
        if not (isinstance(self.low, Real) and isinstance(self.high, Real)) or isinstance(self.low, bool) \
                or isinstance(self.high, bool):
            raise TypeError(f"Interval bounds low and high must be real numbers, got low={self.low!r}, high={self.high!r}")
        if not isinstance(self.open_high, bool):
            raise TypeError(f"Interval open_high must be a bool, got {self.open_high!r}")
        if math.isnan(self.low) or math.isnan(self.high) or self.low > self.high:
            raise ValueError(f"Interval needs low <= high, got low={self.low!r}, high={self.high!r}")
        if self.open_high and self.low >= self.high:
            raise ValueError(f"Interval [low, high) is empty: low={self.low!r} must be below high={self.high!r}")

    def contains(self, value) -> bool:
        value = _real_scalar(value)
        if value is None:
            return False
        if self.open_high:
            return self.low <= value < self.high
        return self.low <= value <= self.high

    @property
    def _top(self) -> float:
        return math.nextafter(self.high, -math.inf) if self.open_high else self.high

    def top(self, dtype: torch.dtype = torch.float64) -> float:
        """The largest value of the interval representable in ``dtype`` (an open end rounds down)."""
        if math.isinf(self.high) or not self.open_high:
            return self.high
        high = torch.tensor(self.high, dtype=dtype)
        return float(torch.nextafter(high, torch.tensor(-math.inf, dtype=dtype)))

    def project(self, value):
        if isinstance(value, torch.Tensor):
            return torch.clamp(value, min=self.low, max=None if math.isinf(self.high) else self.top(value.dtype))
        return min(max(float(value), self.low), self._top)

    def describe(self) -> str:
        high = "inf" if math.isinf(self.high) else repr(self.high)
        close = ")" if (self.open_high or math.isinf(self.high)) else "]"
        return f"[{self.low!r}, {high}{close}"


def NonNegative() -> Interval:
    """``[0, inf)``: learning rates, weight decay."""
    return Interval(0.0, math.inf, open_high=True)


def Beta() -> Interval:
    """``[0, 1)``: an EMA factor (beta = 1 would zero the bias correction 1 - beta^t)."""
    return Interval(0.0, 1.0, open_high=True)


@dataclass(frozen=True)
class Positive(Domain):
    """``(0, inf)`` for quantities that must stay strictly positive (``eps``).

    Projection maps onto ``[floor, inf)`` with a small documented floor, because the open set has
    no Euclidean projection.
    """

    floor: float = 1e-30

    def __post_init__(self):
        if isinstance(self.floor, bool) or not isinstance(self.floor, Real):
            raise TypeError(f"Positive floor must be a real number, got {self.floor!r}")
        if not (0 < self.floor < math.inf):
            raise ValueError(f"Positive floor must be finite and > 0, got {self.floor!r}")

    def contains(self, value) -> bool:
        value = _real_scalar(value)
        return value is not None and 0.0 < value < math.inf

    def project(self, value):
        if isinstance(value, torch.Tensor):  # a floor below the dtype's range would round to 0
            return torch.clamp(value, min=max(self.floor, torch.finfo(value.dtype).tiny))
        return max(float(value), self.floor)

    def describe(self) -> str:
        return "(0, inf)"


@dataclass(frozen=True)
class Simplex(Domain):
    """The probability simplex ``{w in R^k : w >= 0, sum w = 1}`` for ``hull`` weights.

    ``project`` is the Euclidean projection (sort-based algorithm of Held et al. / Duchi et al.).
    """

    size: int
    tolerance: float = 1e-9

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"Simplex size must be a positive int, got {self.size!r}")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, Real):
            raise TypeError(f"Simplex tolerance must be a real number, got {self.tolerance!r}")
        if not (0 <= self.tolerance < math.inf):
            raise ValueError(f"Simplex tolerance must be finite and >= 0, got {self.tolerance!r}")

    def contains(self, value) -> bool:
        w = _as_float_tensor(value) if not isinstance(value, (list, tuple)) else torch.as_tensor(value, dtype=torch.float64)
        if w.shape != (self.size,) or not torch.isfinite(w).all():
            return False
        # a low-precision projection sums to 1 only up to its own rounding
        tol = max(self.tolerance, 4 * torch.finfo(w.dtype).eps) if w.is_floating_point() else self.tolerance
        return bool((w >= -tol).all()) and abs(float(w.sum()) - 1.0) <= tol * self.size + 1e-12

    def project(self, value):
        w = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)
        u, _ = torch.sort(w, descending=True)
        css = torch.cumsum(u, 0) - 1
        ks = torch.arange(1, w.numel() + 1, dtype=w.dtype, device=w.device)
        cond = (u - css / ks) > 0
        # rho = the last index where cond holds (cond is monotone: True...True False...False)
        rho = torch.sum(cond.to(torch.int64)) - 1
        theta = css.gather(0, rho.reshape(1)) / (rho.to(w.dtype) + 1)
        return torch.clamp(w - theta, min=0)

    def describe(self) -> str:
        return f"the {self.size}-simplex (non-negative, summing to 1)"


@dataclass(frozen=True)
class Coefficient:
    """Declaration of one named hyperparameter of a rule.

    Attributes:
        name: identifier, used as keyword argument and as key of the hyperparameter dict ``h``.
        init: default / initial value (must lie in ``domain``).
        domain: admissible values.
        learnable: learned by the hyper-gradient engine unless the user says otherwise.
        doc: one line for documentation and error messages.
    """

    name: str
    init: Union[Number, tuple]
    domain: Domain = field(default_factory=lambda: Interval(0.0, 1.0))
    learnable: bool = True
    doc: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Coefficient name must be a Python identifier, got {self.name!r}")
        if not isinstance(self.domain, Domain):
            raise TypeError(f"Coefficient {self.name!r} domain must be a Domain (Interval, Positive, Simplex...), "
                            f"got {self.domain!r}")
        if not isinstance(self.learnable, bool):
            raise TypeError(f"Coefficient {self.name!r} learnable must be a bool, got {self.learnable!r}")
        self.validate(self.init, what=f"Coefficient {self.name!r} init")

    def validate(self, value, what: str | None = None):
        """Raise ``ValueError``/``TypeError`` naming the argument unless ``value`` is admissible."""
        label = what or f"argument {self.name!r}"
        if isinstance(self.domain, Simplex):
            if not self.domain.contains(value):
                raise ValueError(f"{label} must lie in {self.domain.describe()}, got {value!r}")
            return value
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise TypeError(f"{label} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        elif isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{label} must be a real number, got {type(value).__name__} {value!r}")
        if not self.domain.contains(value):
            raise ValueError(f"{label} must lie in {self.domain.describe()}, got {float(value)!r}")
        return value
