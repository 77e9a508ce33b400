"""The convex counterexample of Reddi et al. (2018), as in the MADA paper (seed 000, eq. 32, figure 8).

    .venv/bin/python -m experiments.convex                      # ~70 s of CPU on one core
    .venv/bin/python -m experiments.convex --steps 3000 --only adam,avgrad,mada_hlr0.1

The online problem on the interval F = [-1, 1]::

    f_t(x) = 1010 x   if t mod 101 == 1
    f_t(x) =  -10 x   otherwise                       t = 1, 2, ...

Every window of 101 steps sums to ``10 x``, so the best fixed point in hindsight is ``x* = -1``
(for every horizon T: each partial sum of the coefficients is >= 10 > 0). Adam forgets the rare large
gradient too fast: its second moment ``v`` decays after the spike, the effective step of the many
small gradients grows, and Adam drifts to the worst point ``x = +1``. AMSGrad (running max of v)
and AVGrad (running average of v) keep the effective step non-increasing and reach -1. MADA
interpolates Adam (rho = 1) and AVGrad (rho = 0), ``v = rho v_bar + (1 - rho) v_tilde``, and learns
rho by hyper-gradient descent; figure 8 of the paper plots its average regret, x_t and rho_t.

Settings (Reddi et al.'s synthetic experiment): beta1 = 0.9, beta2 = 0.99, step size
``alpha_t = alpha / sqrt(t)``, x_1 = 0. ``alpha`` is not given in either paper; ``alpha = 1`` here
(experiments/README.md notes what a few other values do). All optimizers are ours: ``RuleOptimizer``
with the ``adam``, ``amsgrad`` and ``avgrad`` rules, and ``hypergrad.MADA`` learning rho only, from
rho_0 = 1 (the Adam vertex; beta3 = 0, c = 1, gamma = 1 fixed, so the family is exactly the
Adam-AVGrad interpolation), one run per hyper-level learning rate in ``--hyper-lrs`` (hyper-level
rule ``--hyper-rule``, default Adam; runs are named ``mada_hlr<lr>``). ``--mada-learn`` adds other
coefficients. AMSGrad/AVGrad "reach -1" asymptotically; at 10k steps they are at -0.80 / -0.92.

Projection onto [-1, 1]: after each step the parameter is clamped IN PLACE under ``no_grad``
(``x.clamp_(-1, 1)``). The tensor object, the optimizer's reference to it and the optimizer's
state stay the same. (The reference code replaced the parameter object at the boundary, which left
the torch optimizers stepping a tensor that was no longer the model's: they froze there.)

Regret: ``R_T = sum_t f_t(x_t) - f_t(x*)``, where x_t is the point played at step t (before the
update that step's gradient drives); the plots show ``R_T / T``.

Writes ``runs/convex/convex.png`` (three panels: average regret, x_t, rho_t) and
``runs/convex/summary.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import hypergrad
import optimizers
from experiments.driver import one_thread, parse_with_output_options, save_figure, write_outputs

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "runs" / "convex"

OPTIMUM = -1.0
BOUNDS = (-1.0, 1.0)


@dataclass(frozen=True)
class ConvexConfig:
    steps: int = 10_000
    alpha: float = 1.0               # alpha_t = alpha / sqrt(t) ("sqrt") or alpha ("constant")
    schedule: str = "sqrt"
    beta1: float = 0.9
    beta2: float = 0.99
    big: float = 1010.0              # C: the rare large gradient (the paper's 1010)
    small: float = -10.0             # the frequent small gradient
    period: int = 101
    x0: float = 0.0
    rho0: float = 1.0                # MADA's initial rho (1 = Adam vertex)
    hyper_rule: str = "adam"         # MADA's hyper-level optimizer
    hyper_lrs: Tuple[float, ...] = (1e-3, 1e-2, 1e-1)   # one MADA run per hyper-level learning rate
    mada_learn: Tuple[str, ...] = ("rho",)
    record_points: int = 2000        # trajectory points kept in the JSON per run (the plot uses every step)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.steps < 1 or self.period < 2:
            raise ValueError(f"need steps >= 1 and period >= 2, got {self.steps}, {self.period}")
        if not BOUNDS[0] <= self.x0 <= BOUNDS[1]:
            raise ValueError(f"x0 must lie in {BOUNDS}, got {self.x0}")
        if self.big + (self.period - 1) * self.small <= 0:
            raise ValueError("the optimum is x = -1 only when big + (period - 1) * small > 0")


SCHEDULES: Dict[str, Callable[[float, int], float]] = {
    "sqrt": lambda alpha, t: alpha / math.sqrt(t),
    "constant": lambda alpha, t: alpha,
}


def coefficient(t: int, cfg: ConvexConfig) -> float:
    """The slope of f_t: ``big`` when ``t mod period == 1``, else ``small`` (t counts from 1)."""
    return cfg.big if t % cfg.period == 1 else cfg.small


# ------------------------------------------------------------------------------------------ optimizers
Factory = Callable[[List[torch.Tensor], ConvexConfig], torch.optim.Optimizer]


def _rule(name: str) -> Factory:
    return lambda params, cfg: optimizers.RuleOptimizer(params, name, lr=cfg.alpha, betas=(cfg.beta1, cfg.beta2))


def _mada(hyper_lr: float) -> Factory:
    # beta3 = 0, c = 1, gamma = 1 (MADA's defaults, given explicitly): with learn=("rho",) the family
    # is exactly the Adam <-> AVGrad interpolation of the paper's figure 8.
    def make(params, cfg):
        return hypergrad.MADA(params, lr=cfg.alpha, beta1=cfg.beta1, beta2=cfg.beta2, beta3=0.0, c=1.0, gamma=1.0,
                              rho=cfg.rho0, learn=list(cfg.mada_learn),
                              tower=hypergrad.Level(cfg.hyper_rule, lr=hyper_lr))
    return make


BASELINES: Dict[str, Factory] = {"adam": _rule("adam"), "amsgrad": _rule("amsgrad"), "avgrad": _rule("avgrad")}


def mada_name(hyper_lr: float) -> str:
    return f"mada_hlr{hyper_lr:g}"


def optimizer_factories(cfg: ConvexConfig) -> Dict[str, Factory]:
    """The runs of ``cfg``: the three baselines, then one MADA per hyper-learning rate."""
    return {**BASELINES, **{mada_name(h): _mada(h) for h in cfg.hyper_lrs}}


# ------------------------------------------------------------------------------------------ one run
def run_one(name: str, cfg: ConvexConfig, progress: bool = False) -> dict:
    """Play ``cfg.steps`` rounds with optimizer ``name``; returns per-step arrays and a summary.

    Returns ``{"x": x_t played at each step (np.ndarray), "x_after": x after the last step,
    "avg_regret": R_t / t, "rho": rho used at each step (MADA) or None, "coefficients": MADA's
    final coefficients, "wall_s": ...}``.
    """
    factories = optimizer_factories(cfg)
    if name not in factories:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {list(factories)}")
    x = torch.nn.Parameter(torch.tensor([cfg.x0], dtype=torch.float64))
    opt = factories[name]([x], cfg)
    learns_rho = isinstance(opt, hypergrad.HyperOptimizer) and "rho" in opt.learn
    fixed_rho = {"adam": 1.0, "avgrad": 0.0}.get(name)
    schedule = SCHEDULES[cfg.schedule]
    played = np.empty(cfg.steps)
    losses = np.empty(cfg.steps)
    rho = np.empty(cfg.steps) if learns_rho else None
    steps = range(1, cfg.steps + 1)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"{name:>8}", file=sys.stderr, leave=False, mininterval=0.5)
    start = time.perf_counter()
    for t in steps:
        for group in opt.param_groups:
            group["lr"] = schedule(cfg.alpha, t)
        c = coefficient(t, cfg)
        opt.zero_grad(set_to_none=True)
        loss = c * x.sum()
        loss.backward()
        played[t - 1] = x.item()
        losses[t - 1] = loss.item()
        opt.step()
        if learns_rho:
            rho[t - 1] = float(opt.coefficients()["rho"])   # the rho step t's update used
        # Projection onto [-1, 1]: in place, same tensor object, optimizer state untouched.
        with torch.no_grad():
            x.clamp_(*BOUNDS)
    wall = time.perf_counter() - start
    t = np.arange(1, cfg.steps + 1)
    opt_losses = np.array([coefficient(int(i), cfg) for i in t]) * OPTIMUM
    avg_regret = np.cumsum(losses - opt_losses) / t
    record = {
        "x": played,
        "x_after": x.item(),
        "avg_regret": avg_regret,
        "rho": rho,
        "fixed_rho": fixed_rho,
        "optimizer": repr(opt),
        "optimizer_object": opt,
        "wall_s": wall,
        "parameter": x,
        "state": opt.state[x],
    }
    if isinstance(opt, hypergrad.HyperOptimizer):
        record["coefficients"] = {k: float(v) for k, v in opt.coefficients().items()}
    return record


def summarize(record: dict, cfg: ConvexConfig) -> dict:
    """JSON-ready summary of ``run_one``'s record: final numbers and subsampled trajectories."""
    T = cfg.steps
    tail = max(1, min(T, 10 * cfg.period))
    idx = np.unique(np.linspace(0, T - 1, min(T, cfg.record_points)).round().astype(int))
    out = {
        "final_avg_regret": float(record["avg_regret"][-1]),
        "final_x": float(record["x_after"]),
        f"mean_x_last_{tail}_steps": float(record["x"][-tail:].mean()),
        "wall_s": record["wall_s"],
        "ms_per_step": 1e3 * record["wall_s"] / T,
        "optimizer": record["optimizer"],
        "trajectory": {
            "t": (idx + 1).tolist(),
            "x": record["x"][idx].tolist(),
            "avg_regret": record["avg_regret"][idx].tolist(),
        },
    }
    if record["rho"] is not None:
        out["final_rho"] = float(record["rho"][-1])
        out["trajectory"]["rho"] = record["rho"][idx].tolist()
    if "coefficients" in record:
        out["final_coefficients"] = record["coefficients"]
    return out


# ------------------------------------------------------------------------------------------ plot
COLORS = {"adam": "tab:red", "amsgrad": "tab:green", "avgrad": "tab:blue"}
LABELS = {"adam": "Adam", "amsgrad": "AMSGrad", "avgrad": "AVGrad"}
MADA_COLORS = ("black", "tab:purple", "tab:orange", "tab:brown", "tab:gray", "tab:olive")


def plot(records: Dict[str, dict], cfg: ConvexConfig, path: Path) -> None:
    """Figure 8 of the MADA paper: average regret, x_t and rho_t against t, one line per optimizer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(1, cfg.steps + 1)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    mada_style = {mada_name(h): (MADA_COLORS[i % len(MADA_COLORS)], f"MADA, hyper-{cfg.hyper_rule} lr {h:g}")
                  for i, h in enumerate(cfg.hyper_lrs)}
    for name, r in records.items():
        color, label = mada_style.get(name, (COLORS.get(name), LABELS.get(name, name)))
        label += f" (final: $R_T/T$ {r['avg_regret'][-1]:.2f}, x {r['x_after']:+.2f})"
        # baselines wider and below, so a MADA run that tracks one (e.g. Adam) leaves it visible
        kw = dict(color=color, label=label, lw=1.0 if name in mada_style else 2.2,
                  zorder=3 if name in mada_style else 2)
        axes[0].plot(t, r["avg_regret"], **kw)
        axes[1].plot(t, r["x"], **kw)
        if r["rho"] is not None:
            axes[2].plot(t, r["rho"], **kw)
        elif r["fixed_rho"] is not None:
            axes[2].plot(t, np.full(cfg.steps, r["fixed_rho"]), ls="--",
                         **{**kw, "lw": 1.0, "label": f"{LABELS.get(name, name)} (fixed)"})
    axes[0].set(title="average regret $R_t/t$", xlabel="iteration t", xscale="log", yscale="log")
    axes[1].set(title="$x_t$ (optimum $x^*=-1$)", xlabel="iteration t", xscale="log", ylim=(-1.05, 1.05))
    axes[1].axhline(OPTIMUM, color="gray", lw=0.6, ls=":")
    axes[2].set(title=r"$\rho_t$ ($\rho=1$ Adam, $\rho=0$ AVGrad)", xlabel="iteration t", xscale="log",
                ylim=(-0.05, 1.05))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    sched = r"$\alpha/\sqrt{t}$" if cfg.schedule == "sqrt" else r"$\alpha$"
    fig.suptitle(f"$f_t(x)={cfg.big:g}x$ if $t$ mod {cfg.period} = 1 else ${cfg.small:g}x$, $x\\in[-1,1]$; "
                 f"step {sched}, $\\alpha$={cfg.alpha:g}, $\\beta$=({cfg.beta1:g}, {cfg.beta2:g}); "
                 f"MADA learns {', '.join(cfg.mada_learn)} from $\\rho_0$={cfg.rho0:g}", fontsize=10)
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------ driver
def run(cfg: ConvexConfig = ConvexConfig(), only: Optional[Sequence[str]] = None, out: Optional[Path] = DEFAULT_OUT,
        progress: bool = True) -> dict:
    """Every run of ``optimizer_factories(cfg)`` (or those in ``only``); writes the plot and JSON to ``out``."""
    factories = optimizer_factories(cfg)
    names = list(factories) if not only else list(only)
    unknown = sorted(set(names) - set(factories))
    if unknown:
        raise ValueError(f"unknown optimizer(s) {unknown}; allowed: {list(factories)}")
    start = time.perf_counter()
    records = {}
    with one_thread():   # one-element tensors
        for name in names:
            records[name] = run_one(name, cfg, progress=progress)
            r = records[name]
            log.info("%-14s avg regret %.4f  final x %+.4f%s  (%.1f s)", name, r["avg_regret"][-1], r["x_after"],
                     f"  rho {r['rho'][-1]:.4f}" if r["rho"] is not None else "", r["wall_s"])
    report = {
        "config": asdict(cfg),
        "problem": f"f_t(x) = {cfg.big:g} x if t mod {cfg.period} == 1 else {cfg.small:g} x, x in [-1, 1], x* = -1",
        "total_wall_s": time.perf_counter() - start,
        "results": {name: summarize(r, cfg) for name, r in records.items()},
    }
    write_outputs(out, "convex.png", lambda path: plot(records, cfg, path), report)
    report["records"] = records     # full-resolution arrays, for callers (not written to JSON)
    return report


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    d = ConvexConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default=d.schedule)
    p.add_argument("--beta1", type=float, default=d.beta1)
    p.add_argument("--beta2", type=float, default=d.beta2)
    p.add_argument("--rho0", type=float, default=d.rho0, help="MADA's initial rho (1 = Adam)")
    p.add_argument("--hyper-rule", default=d.hyper_rule, help="MADA's hyper-level rule (default adam)")
    p.add_argument("--hyper-lrs", type=lambda s: tuple(float(x) for x in s.split(",") if x), default=d.hyper_lrs,
                   help="comma-separated hyper-level learning rates, one MADA run each")
    p.add_argument("--mada-learn", type=lambda s: tuple(x for x in s.split(",") if x), default=d.mada_learn,
                   help="comma-separated MADA coefficients to learn (default: rho)")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated run names: adam,amsgrad,avgrad,mada_hlr<lr> (e.g. mada_hlr0.01)")
    return parse_with_output_options(p, argv, DEFAULT_OUT)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = ConvexConfig(steps=args.steps, alpha=args.alpha, schedule=args.schedule, beta1=args.beta1,
                       beta2=args.beta2, rho0=args.rho0, hyper_rule=args.hyper_rule, hyper_lrs=args.hyper_lrs,
                       mada_learn=args.mada_learn)
    report = run(cfg, only=args.only, out=args.out, progress=not args.no_progress)
    print(f"{report['problem']}; {cfg.steps} steps, alpha_t = {cfg.alpha:g}"
          f"{'/sqrt(t)' if cfg.schedule == 'sqrt' else ''}, betas ({cfg.beta1:g}, {cfg.beta2:g})\n")
    print("| optimizer | avg regret R_T/T | final x | final rho | s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in report["results"].items():
        rho = f"{r['final_rho']:.4f}" if "final_rho" in r else "-"
        print(f"| {name} | {r['final_avg_regret']:.4f} | {r['final_x']:+.4f} | {rho} | {r['wall_s']:.1f} |")
    print(f"\ntotal {report['total_wall_s']:.0f} s; wrote {args.out}/convex.png and summary.json")
    return report


if __name__ == "__main__":
    main()
