"""Check the engine's hypergradients against central finite differences (design.md §2.3).

The engine's hypergradient at step t is dF_t(x_{t-1})/dq with x_{t-1} the result of the last
update, the state before it held fixed. The finite-difference oracle reruns that last update from
a saved copy of (x_{t-2}, state_{t-2}, g_{t-1}) with q +- delta e_i through the plain update
function (no vjp, no domain validation so vertices on a domain's boundary can be probed), evaluates
F_t on the same batch, and takes the central difference.

    python -m hypergrad.gradcheck            # MADA, small built-in model, float64, interior point
    python -m hypergrad.gradcheck --point adam --steps 5 --tol 1e-6

Exits non-zero when any relative error exceeds the tolerance.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from optimizers import Family, MADA_VERTICES, get_rule
from optimizers.adapter import displacement, flatten, unflatten_like

from .optimizer import HyperOptimizer
from .tower import Level

__all__ = ["CoefficientCheck", "check_hypergradients", "check_tower_hypergradients",
           "finite_difference_hypergradients", "finite_difference_noise", "main"]

log = logging.getLogger(__name__)

# Interior point of MADA used by the command and the tests: every coefficient strictly inside its domain.
MADA_INTERIOR = {"beta1": 0.85, "beta2": 0.93, "beta3": 0.3, "c": 0.4, "rho": 0.6, "gamma": 0.7}


@dataclass
class CoefficientCheck:
    """One coefficient's comparison.

    ``relative_error = |engine - fd| / max(|engine|, |fd|)``. ``noise`` bounds the finite
    difference's own float64 round-off (10 eps |F| 18/(12 delta)); an exactly-zero hypergradient
    (every adaptive coefficient at the Lion vertex, where gamma = 0 multiplies them) can only be
    confirmed to within it, so ``passed`` also accepts ``|engine - fd| <= noise`` when the engine
    value is exactly 0.
    """

    name: str
    engine: float
    finite_difference: float
    noise: float = 0.0

    @property
    def relative_error(self) -> float:
        scale = max(abs(self.engine), abs(self.finite_difference), 1e-300)
        return abs(self.engine - self.finite_difference) / scale

    def passed(self, tol: float) -> bool:
        if self.engine == 0.0:
            return abs(self.finite_difference) <= self.noise
        return self.relative_error <= tol


def finite_difference_hypergradients(family: Family, snapshot: Mapping, coefficients: Mapping[str, float],
                                     learn: Sequence[str], model: nn.Module, loss_fn: Callable[[nn.Module], Tensor],
                                     delta: float = 1e-3) -> Dict[str, float]:
    """Central differences of F_t(x_{t-1}(q)) for each name in ``learn``, from a saved pre-update snapshot.

    Five-point stencil ``(-F(q+2d) + 8F(q+d) - 8F(q-d) + F(q-2d)) / 12d``: its O(d^4) truncation error
    lets ``d`` be large enough that float64 round-off in F (~1e-16 |F| / d) stays far below the
    tolerance, and small enough (default 1e-5) that no Yogi ``sign(g^2 - v)`` flips inside the
    stencil (F is piecewise smooth in beta3 and c; a flip would be a jump, not a derivative).
    """
    out = {}
    for name in learn:
        values = {}
        for k in (2, 1, -1, -2):
            h = dict(snapshot["h"])
            h[name] = coefficients[name] + k * delta
            d, _ = displacement(family, snapshot["g"], snapshot["state"], snapshot["x"], h, snapshot["t"],
                                snapshot["mode"])
            values[k] = _loss_value(model, snapshot, snapshot["x"] + d, loss_fn)
        out[name] = (-values[2] + 8 * values[1] - 8 * values[-1] + values[-2]) / (12 * delta)
    return out


def finite_difference_noise(loss: float, delta: float) -> float:
    """Upper bound on the round-off of the five-point stencil in float64."""
    return 10 * torch.finfo(torch.float64).eps * max(abs(loss), 1e-300) * 18 / (12 * delta)


def _loss_value(model: nn.Module, snapshot: Mapping, flat_x: Tensor, loss_fn) -> float:
    """F(x) with the model's parameters temporarily set to ``flat_x`` (restored afterwards)."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_copy_(params, unflatten_like(flat_x, params))
        try:
            return float(loss_fn(model))
        finally:
            torch._foreach_copy_(params, saved)


def check_hypergradients(model: nn.Module, loss_fns: Sequence[Callable[[nn.Module], Tensor]],
                         family: Family | str = "mada", coefficients: Optional[Mapping[str, float]] = None,
                         learn: Optional[Sequence[str]] = None, lr: float = 1e-2, weight_decay: float = 0.0,
                         delta: float = 1e-5) -> List[CoefficientCheck]:
    """Train ``len(loss_fns)`` steps with fixed coefficients and compare the last step's hypergradients.

    ``loss_fns[i](model)`` is the loss on batch i (closures over fixed batches). The engine runs with
    a zero hyper-learning rate so that the coefficients stay at ``coefficients``; at the last step its
    hypergradient dF_t/dq is compared with central differences of F_t through the last update.
    The model is trained in place (pass a copy to keep yours).
    """
    family = get_rule(family) if isinstance(family, str) else family
    coefficients = dict(coefficients or {})
    if len(loss_fns) < 2:
        raise ValueError(f"loss_fns needs at least 2 batches (one update, then the loss after it), got {len(loss_fns)}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = HyperOptimizer(params, family, lr=lr, weight_decay=weight_decay, learn=learn,
                         tower=Level("sgd", lr=0.0), **coefficients)
    learn = list(opt.learn)
    snapshot = None
    for i, loss_fn in enumerate(loss_fns):
        opt.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        if i == len(loss_fns) - 2:
            group = opt.param_groups[0]
            with_grad = [p for p in params if p.grad is not None]
            if len(with_grad) != len(params):
                raise ValueError("check_hypergradients needs a gradient for every parameter at the checked step")
            step = int(opt.state[params[0]].get("step", 0)) if opt.state.get(params[0]) else 0
            if opt.state.get(params[0]):
                state = {s.name: flatten([opt.state[p][s.name] for p in params], copy=True) if not s.scalar
                         else opt.state[params[0]][s.name].clone() for s in family.states}
            else:
                state = family.init_state(flatten(params, copy=True))
            h = {n: group[n] for n in family.coefficients}
            h.update({n: float(v) for n, v in opt.coefficients().items()})
            h["lr"] = group["lr"]
            h["weight_decay"] = group["weight_decay"]
            snapshot = dict(g=flatten([p.grad for p in params], copy=True), x=flatten(params, copy=True),
                            state=state, h=h, t=float(step + 1), mode=group["weight_decay_mode"],
                            )
        opt.step()
    engine = {n: float(v) for n, v in opt.hypergradients().items()}
    fd = finite_difference_hypergradients(family, snapshot, {n: snapshot["h"][n] for n in learn}, learn, model,
                                          loss_fns[-1], delta)
    noise = finite_difference_noise(_loss_value(model, snapshot, snapshot["x"], loss_fns[-1]), delta)
    return [CoefficientCheck(n, engine[n], fd[n], noise) for n in learn]


def check_tower_hypergradients(build: Callable[[], Tuple[nn.Module, HyperOptimizer]],
                               loss_fns: Sequence[Callable[[nn.Module], Tensor]],
                               delta: float | Sequence[float] = 1e-5) -> List[List[CoefficientCheck]]:
    """Check every level of a tower: dF_t/dq_k for each level vector q_k, k = 1..L.

    ``build()`` must return a fresh, deterministic ``(model, optimizer)`` pair. The engine's values
    are read at the last step. The oracle replays the whole run and, at the step before, shifts
    entry i of q_k by +-delta right after level k has updated it (before the levels below and the
    model use it), then evaluates the last loss: a central difference of F_t through the chain
    q_k -> q_{k-1} -> ... -> x_{t-1}, the state before each update held fixed as in the engine.
    Needs at least 3 losses (the tower first moves at the second step). ``delta`` may be one step
    per level: upper levels often have tiny hypergradients, which want a larger step to rise above
    round-off, while level 1 wants a small one (no Yogi sign flip inside the stencil).
    """
    if len(loss_fns) < 3:
        raise ValueError(f"loss_fns needs at least 3 batches, got {len(loss_fns)}")

    def run(perturbation=None):
        model, opt = build()
        for i, loss_fn in enumerate(loss_fns[:-1]):
            opt.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            if i == len(loss_fns) - 2:
                opt._perturbation = perturbation
            opt.step()
        return model, opt

    model, opt = run()
    opt.zero_grad(set_to_none=True)
    loss_fns[-1](model).backward()
    opt.step()
    engine = [d.detach().clone() for d in opt._hypergrads]
    layouts = opt._layouts
    base_model, _ = run()
    deltas = [float(delta)] * len(layouts) if isinstance(delta, (int, float)) else [float(d) for d in delta]
    if len(deltas) != len(layouts):
        raise ValueError(f"delta has {len(deltas)} entries but the tower has {len(layouts)} levels")
    with torch.no_grad():
        base_loss = float(loss_fns[-1](base_model))
    out = []
    for k, layout in enumerate(layouts):
        delta = deltas[k]
        noise = finite_difference_noise(base_loss, delta)
        level = []
        for s in range(layout.sets):
            for name in layout.names:
                i = layout.index(s, name)
                values = {}
                for m in (2, 1, -1, -2):
                    replay, _ = run((k, i, m * delta))
                    with torch.no_grad():
                        values[m] = float(loss_fns[-1](replay))
                fd = (-values[2] + 8 * values[1] - 8 * values[-1] + values[-2]) / (12 * delta)
                label = name if layout.sets == 1 else f"{name}[{s}]"
                level.append(CoefficientCheck(f"level{k + 1}.{label}", float(engine[k][i]), fd, noise))
        out.append(level)
    return out


# ------------------------------------------------------------------------------------------ command
class _TinyNet(nn.Module):
    """A small MLP with several parameter tensors; a built-in model for the command."""

    def __init__(self, d_in=6, d_hidden=16, d_out=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def builtin_problem(steps: int = 10, seed: int = 0, dtype=torch.float64):
    """A seeded float64 regression problem: ``(model, [loss_fn per batch])``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _TinyNet().to(dtype)
    batches = [(torch.randn(32, 6, generator=g, dtype=dtype), torch.randn(32, 4, generator=g, dtype=dtype))
               for _ in range(steps)]

    def make(x, y):
        return lambda m: torch.nn.functional.mse_loss(m(x), y)

    return model, [make(x, y) for x, y in batches]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hypergrad.gradcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--point", default="interior", choices=["interior", *MADA_VERTICES],
                        help="MADA coefficients: an interior point or a named vertex (default interior)")
    parser.add_argument("--steps", type=int, default=10, help="training steps before the check (>= 2)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--delta", type=float, default=1e-5, help="finite-difference step")
    parser.add_argument("--tol", type=float, default=1e-6, help="maximum relative error")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    coefficients = dict(MADA_INTERIOR)
    if args.point != "interior":
        coefficients.update(MADA_VERTICES[args.point])
    model, loss_fns = builtin_problem(args.steps, args.seed)
    checks = check_hypergradients(model, loss_fns, "mada", coefficients,
                                  learn=("beta1", "beta2", "beta3", "c", "rho", "gamma"),
                                  lr=args.lr, weight_decay=args.weight_decay, delta=args.delta)
    print(f"MADA hypergradient check, point={args.point}, float64, {args.steps} steps, delta={args.delta:g}")
    print(f"{'coefficient':>12} {'value':>8} {'engine':>14} {'finite diff':>14} {'rel. error':>10}")
    worst, ok = 0.0, True
    for c in checks:
        zero = c.engine == 0.0
        if not zero:
            worst = max(worst, c.relative_error)
        ok &= c.passed(args.tol)
        note = ("" if c.passed(args.tol) else "  FAIL") + (f"  (exactly 0; |fd| <= noise {c.noise:.1e})" if zero else "")
        error = "-" if zero else f"{c.relative_error:.2e}"
        print(f"{c.name:>12} {coefficients[c.name]:8.3f} {c.engine:14.6e} {c.finite_difference:14.6e} {error:>10}{note}")
    print(f"max relative error {worst:.2e} (tolerance {args.tol:g}): {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
