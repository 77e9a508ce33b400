"""Stacking sensitivity: do taller towers of hyper-optimizers make SGD less sensitive to its initial lr?

    .venv/bin/python -m experiments.stacking                    # full grid, see experiments/README.md for timing
    .venv/bin/python -m experiments.stacking --lrs 1e-3,1e-1 --depths 0,1 --seeds 0 --steps 100

The claim under test (Chandra et al. 2022, "Gradient Descent: The Ultimate Optimizer"; seed 002:
"stacking more optimizers reduces sensitivity to initial hyper-parameters"). Setting:

Data
    scikit-learn's ``load_digits`` (1797 8x8 images, 10 classes, ships with the package), pixels
    standardised with the training split's mean and std; one fixed stratified split, 1347 train
    / 450 test (``train_test_split(test_size=0.25, random_state=0)``).
Model
    MLP 64 -> 128 (tanh) -> 10, torch's default init from the run's seed; cross-entropy.
Training
    ``steps`` minibatch steps of ``batch_size`` examples drawn with replacement from the training
    split by a generator seeded with the run's seed. For one seed every run (each depth, each
    initial lr) sees the same initial weights and the same batches: only the optimizer differs.
Towers (the base optimizer is plain SGD with initial learning rate ``lr0``; kappa_k = hyper_lrs[k-1])
    depth 0: SGD, lr0 fixed.
    depth 1: SGD whose lr is learned by an SGD hyper-level with rate kappa_1 (Baydin et al.'s
             SGD-HD): ``HyperOptimizer(p, sgd, lr=lr0, learn=["lr"], tower=[Level("sgd", lr=kappa_1)])``.
    depth 2: kappa_1 is itself learned by a level-2 SGD with rate kappa_2
             (``tower=[Level("sgd", lr=kappa_1, learn=["lr"]), Level("sgd", lr=kappa_2)]``).
    depth 3: one more level, kappa_2 learned with rate kappa_3.
    The hyper-learning rates are the same for every lr0 (tuning them per lr0 would defeat the
    purpose); their choice is explained in experiments/README.md. Every learned rate is projected
    onto [0, inf) after each hyper-step (the engine's domain for ``lr``).
Measured
    the final test loss (mean cross-entropy on the 450 test images) per (depth, lr0, seed), plus
    final train loss, test accuracy and the final learned lr. A run whose loss becomes non-finite
    is stopped and recorded as diverged (test loss NaN); the plot draws the median over seeds and
    marks a point where a majority diverged.

Writes ``runs/stacking/stacking.png`` (final test loss vs initial lr, log x, one line per depth)
and ``runs/stacking/summary.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad
import optimizers
from experiments.driver import one_thread, parse_with_output_options, save_figure, write_outputs

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "runs" / "stacking"


@dataclass(frozen=True)
class StackingConfig:
    lrs: Tuple[float, ...] = tuple(float(f"{x:.3g}") for x in np.logspace(-4, 1, 11))  # 1e-4 ... 10, 2 per decade
    depths: Tuple[int, ...] = (0, 1, 2, 3)
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)
    hyper_lrs: Tuple[float, ...] = (1e-3, 1e-4, 1e-5)   # kappa_1, kappa_2, kappa_3 (level 1 is nearest the model)
    steps: int = 500
    batch_size: int = 32
    hidden: int = 128
    test_size: float = 0.25
    split_seed: int = 0

    def __post_init__(self):
        if any(d < 0 for d in self.depths) or max(self.depths, default=0) > len(self.hyper_lrs):
            raise ValueError(f"depths must lie in 0..{len(self.hyper_lrs)} (one hyper_lr per level), got {self.depths}")
        if any(not lr > 0 for lr in self.lrs) or any(not k >= 0 for k in self.hyper_lrs):
            raise ValueError("learning rates must be > 0 and hyper-learning rates >= 0")


# ------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Digits:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_split(test_size: float = 0.25, seed: int = 0) -> Digits:
    """scikit-learn's digits, one stratified split, standardised with the training split's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(data.data, data.target, test_size=test_size, random_state=seed,
                                              stratify=data.target)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6   # some border pixels are always 0
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)
    return Digits(f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te))


def make_mlp(in_features: int, hidden: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, classes))


# ------------------------------------------------------------------------------------------ towers
def make_optimizer(params, depth: int, lr0: float, hyper_lrs: Sequence[float]) -> torch.optim.Optimizer:
    """The depth-``depth`` tower over plain SGD with initial learning rate ``lr0`` (see module docstring)."""
    sgd = optimizers.get_rule("sgd").vertex("plain")
    if depth == 0:
        return optimizers.RuleOptimizer(params, sgd, lr=lr0)
    tower = [hypergrad.Level("sgd", lr=hyper_lrs[k], learn=["lr"] if k < depth - 1 else [])
             for k in range(depth)]
    return hypergrad.HyperOptimizer(params, sgd, lr=lr0, learn=["lr"], tower=tower)


def learned_lrs(opt: torch.optim.Optimizer) -> List[float]:
    """[lr, kappa_1, ...]: the current value of every learned rate, bottom first."""
    if isinstance(opt, hypergrad.HyperOptimizer):
        return [float(v["lr"]) for v in opt.tower_values()]
    return [float(opt.param_groups[0]["lr"])]


# ------------------------------------------------------------------------------------------ one run
@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> Tuple[float, float]:
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def run_one(data: Digits, depth: int, lr0: float, seed: int, cfg: StackingConfig) -> dict:
    """Train one MLP with the depth-``depth`` tower from ``lr0``; returns its record."""
    model = make_mlp(data.x_train.shape[1], cfg.hidden, int(data.y_train.max()) + 1, seed)
    opt = make_optimizer(model.parameters(), depth, lr0, cfg.hyper_lrs)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    diverged_at = None
    start = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        if not math.isfinite(loss.item()):
            diverged_at = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    wall = time.perf_counter() - start
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    train_loss, train_acc = evaluate(model, data.x_train, data.y_train)
    if diverged_at is None and not (math.isfinite(test_loss) and math.isfinite(train_loss)):
        diverged_at = cfg.steps
    if diverged_at is not None:
        test_loss = train_loss = test_acc = train_acc = float("nan")
    return {"depth": depth, "lr0": lr0, "seed": seed, "test_loss": test_loss, "test_acc": test_acc,
            "train_loss": train_loss, "train_acc": train_acc, "diverged_at": diverged_at,
            "final_rates": learned_lrs(opt), "wall_s": wall}


# ------------------------------------------------------------------------------------------ aggregate
def aggregate(runs: List[dict], cfg: StackingConfig) -> Dict[str, dict]:
    """Per depth: median / min / max test loss over seeds for each lr0, and the sensitivity numbers.

    ``spread`` = max - min over lr0 of the median test loss (inf when some lr0 diverged for most
    seeds); ``worst`` = the largest median; ``best`` = the smallest.
    """
    out: Dict[str, dict] = {}
    for depth in cfg.depths:
        med, lo, hi, div = [], [], [], []
        for lr0 in cfg.lrs:
            vals = np.array([r["test_loss"] for r in runs if r["depth"] == depth and r["lr0"] == lr0])
            finite = vals[np.isfinite(vals)]
            div.append(int(len(vals) - len(finite)))
            majority_diverged = len(finite) * 2 <= len(vals) and len(vals) > 0
            med.append(float("nan") if majority_diverged else float(np.median(finite)))
            lo.append(float(finite.min()) if len(finite) else float("nan"))
            hi.append(float(finite.max()) if len(finite) else float("nan"))
        m = np.array(med)
        ok = np.isfinite(m)
        out[str(depth)] = {
            "median_test_loss": med, "min_test_loss": lo, "max_test_loss": hi, "diverged_seeds": div,
            "best": float(m[ok].min()) if ok.any() else float("nan"),
            "worst": float(m[ok].max()) if ok.all() else float("inf"),
            "spread": float(m.max() - m.min()) if ok.all() else float("inf"),
            "mean_over_lrs": float(m.mean()) if ok.all() else float("inf"),
        }
    return out


def plot(runs: List[dict], summary: Dict[str, dict], cfg: StackingConfig, path: Path) -> None:
    """Final test loss against initial lr (log x), one line per depth: median over seeds, min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = np.array(cfg.lrs)
    finite_all = [r["test_loss"] for r in runs if math.isfinite(r["test_loss"])]
    ceiling = max(finite_all) * 1.1 if finite_all else 3.0
    fig, ax = plt.subplots(figsize=(7, 4.6))
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.85, max(len(cfg.depths), 2)))
    for color, depth in zip(colors, cfg.depths):
        s = summary[str(depth)]
        med = np.array(s["median_test_loss"])
        label = "depth 0: SGD, lr fixed" if depth == 0 else \
            f"depth {depth}: " + " / ".join(["SGD"] * (depth + 1))
        ax.plot(lrs, np.where(np.isfinite(med), med, np.nan), "o-", color=color, label=label, ms=4)
        ax.fill_between(lrs, s["min_test_loss"], s["max_test_loss"], color=color, alpha=0.15, lw=0)
        bad = ~np.isfinite(med)
        if bad.any():
            ax.plot(lrs[bad], np.full(bad.sum(), ceiling), "x", color=color, ms=9, mew=2)
    if any(not np.isfinite(np.array(summary[str(d)]["median_test_loss"])).all() for d in cfg.depths):
        ax.text(0.02, 0.97, "x: diverged for most seeds", transform=ax.transAxes, fontsize=8, va="top")
    kappas = ", ".join(f"$\\kappa_{k + 1}$={h:g}" for k, h in enumerate(cfg.hyper_lrs[:max(cfg.depths, default=0)]))
    ax.set(xscale="log", yscale="log", xlabel="initial learning rate of the model's SGD",
           ylabel="final test loss (cross-entropy)",
           title=f"digits MLP, {cfg.steps} steps of batch {cfg.batch_size}; median of {len(cfg.seeds)} seeds "
                 f"(band: min-max)\n{kappas}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------ driver
def run(cfg: StackingConfig = StackingConfig(), out: Optional[Path] = DEFAULT_OUT, progress: bool = True) -> dict:
    data = load_digits_split(cfg.test_size, cfg.split_seed)
    grid = list(itertools.product(cfg.seeds, cfg.depths, cfg.lrs))
    log.info("stacking: %d runs (%d seeds x %d depths x %d lrs), %d steps each", len(grid), len(cfg.seeds),
             len(cfg.depths), len(cfg.lrs), cfg.steps)
    if progress:
        from tqdm import tqdm
        grid = tqdm(grid, desc="stacking", file=sys.stderr)
    start = time.perf_counter()
    with one_thread():   # tiny tensors
        runs = [run_one(data, depth, lr0, seed, cfg) for seed, depth, lr0 in grid]
    summary = aggregate(runs, cfg)
    for depth in cfg.depths:
        s = summary[str(depth)]
        log.info("depth %d: median test loss per lr0 %s; spread %.3f", depth,
                 " ".join(f"{v:.3f}" for v in s["median_test_loss"]), s["spread"])
    report = {"config": asdict(cfg), "n_train": len(data.y_train), "n_test": len(data.y_test),
              "total_wall_s": time.perf_counter() - start, "summary": summary, "runs": runs}
    write_outputs(out, "stacking.png", lambda path: plot(runs, summary, cfg, path), report)
    return report


def _floats(s: str) -> Tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x)


def _ints(s: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    d = StackingConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lrs", type=_floats, default=d.lrs, help="comma-separated initial learning rates")
    p.add_argument("--depths", type=_ints, default=d.depths)
    p.add_argument("--seeds", type=_ints, default=d.seeds)
    p.add_argument("--hyper-lrs", type=_floats, default=d.hyper_lrs, help="kappa_1,kappa_2,kappa_3")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    return parse_with_output_options(p, argv, DEFAULT_OUT)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = StackingConfig(lrs=args.lrs, depths=args.depths, seeds=args.seeds, hyper_lrs=args.hyper_lrs,
                         steps=args.steps, batch_size=args.batch_size)
    report = run(cfg, out=args.out, progress=not args.no_progress)
    print(f"digits MLP, {cfg.steps} steps of batch {cfg.batch_size}, seeds {list(cfg.seeds)}, "
          f"hyper-lrs {list(cfg.hyper_lrs)}; median final test loss over seeds (NaN: most seeds diverged)\n")
    print("| depth | " + " | ".join(f"lr0={lr:g}" for lr in cfg.lrs) + " | spread | worst |")
    print("|---" * (len(cfg.lrs) + 3) + "|")
    for depth in cfg.depths:
        s = report["summary"][str(depth)]
        print(f"| {depth} | " + " | ".join(f"{v:.3f}" for v in s["median_test_loss"]) +
              f" | {s['spread']:.3f} | {s['worst']:.3f} |")
    print(f"\ntotal {report['total_wall_s']:.0f} s; wrote {args.out}/stacking.png and summary.json")
    return report


if __name__ == "__main__":
    main()
