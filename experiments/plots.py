"""Plots of ``experiments.train`` logs (matplotlib, Agg backend: no display needed).

* ``plot_losses``: train and val loss against iteration for several runs, side by side. The
  solid lines with markers are the losses on the fixed eval batches (the numbers the tables
  report); the faint line in the train panel is the logged minibatch loss, smoothed.
* ``plot_coefficients``: MADA's coefficient trajectories, one panel per coefficient
  (beta1, beta2, beta3, c, rho, gamma against iteration) in a 2 x 3 grid, as in figures 4-6 of
  the MADA paper. Several runs overlay; a coefficient a run does not learn is left out of its panel.

Both read the JSONL logs (``read_log``), so a figure can be redrawn from a finished run:

    .venv/bin/python -m experiments.plots runs/demo/adamw/log.jsonl runs/demo/mada/log.jsonl --out=runs/demo
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["read_log", "plot_losses", "plot_coefficients", "COEFFICIENTS", "main"]

log = logging.getLogger(__name__)

COEFFICIENTS = ("beta1", "beta2", "beta3", "c", "rho", "gamma")
_LABELS = {"beta1": r"$\beta_1$", "beta2": r"$\beta_2$", "beta3": r"$\beta_3$", "c": r"$c$", "rho": r"$\rho$",
           "gamma": r"$\gamma$"}
# What each coefficient interpolates between (MADA, design.md section 2.2).
_MEANING = {"beta3": "0: no Adan term", "c": "1 Adam  /  0 Yogi", "rho": "1 Adam  /  0 AVGrad",
            "gamma": "1 adaptive  /  0 Lion"}

Log = Dict[str, Any]
LogLike = Union[str, os.PathLike, Log]


def read_log(path: Union[str, os.PathLike]) -> Log:
    """``{"manifest": dict, "iters": [...], "evals": [...]}`` from a ``log.jsonl``."""
    out: Log = {"manifest": None, "iters": [], "evals": [], "path": str(path)}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            kind = rec.get("type")
            if kind == "manifest":
                out["manifest"] = rec
            elif kind == "iter":
                out["iters"].append(rec)
            elif kind == "eval":
                out["evals"].append(rec)
            else:
                raise ValueError(f"{path}:{n}: unknown record type {kind!r}")
    return out


def _as_log(x: LogLike) -> Log:
    return x if isinstance(x, dict) else read_log(x)


def _smooth(values: Sequence[float], points: int = 40) -> List[float]:
    """Centred moving average over about ``len(values) / points`` neighbours (no lag, unlike an EMA)."""
    half = max(len(values) // points, 1) // 2
    out = []
    for i in range(len(values)):
        window = values[max(i - half, 0): i + half + 1]
        out.append(sum(window) / len(window))
    return out


def _save(fig, path: Union[str, os.PathLike]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)   # atomic: a reader never sees half a PNG
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    log.info("wrote %s", path)
    return path


def plot_losses(runs: Mapping[str, LogLike], path: Union[str, os.PathLike], title: Optional[str] = None) -> Path:
    """Train (left) and val (right) loss against iteration, one colour per run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, run) in enumerate(runs.items()):
        run = _as_log(run)
        color = colors[i % len(colors)]
        iters = [r for r in run["iters"] if r.get("loss") is not None]
        if iters:
            axes[0].plot([r["iter"] for r in iters], _smooth([r["loss"] for r in iters]), color=color, alpha=0.3,
                         lw=1, label=f"{label} (minibatch, smoothed)")
        for ax, split in zip(axes, ("train", "val")):
            pts = [(e["iter"], e[f"{split}_loss"]) for e in run["evals"] if e.get(f"{split}_loss") is not None]
            if pts:
                xs, ys = zip(*pts)
                best = min(ys)
                ax.plot(xs, ys, color=color, marker="o", ms=3, lw=1.6, label=f"{label} (best {best:.3f})")
    for ax, split in zip(axes, ("train", "val")):
        ax.set_xlabel("iteration")
        ax.set_title(f"{split} loss (fixed eval batches)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("cross-entropy (nats/char)")
    # The first evaluations (ln(vocab) ~ 4.4) squash the interesting part: zoom to the tail.
    finals = [e.get("val_loss") or e.get("train_loss") for run in runs.values() for e in _as_log(run)["evals"]]
    finals = [v for v in finals if v is not None]
    if finals:
        low = min(finals)
        axes[0].set_ylim(low - 0.1, min(max(finals), low + 1.6))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def mada_domains() -> Dict[str, Tuple[float, float]]:
    """``{name: (low, high)}`` of MADA's interval coefficients (the projection bounds)."""
    from optimizers import Interval, mada   # experiments -> optimizers: the allowed direction
    return {n: (c.domain.low, c.domain.high) for n, c in mada().coefficients.items() if isinstance(c.domain, Interval)}


def plot_coefficients(runs: Mapping[str, LogLike], path: Union[str, os.PathLike], title: Optional[str] = None,
                      names: Sequence[str] = COEFFICIENTS,
                      domains: Optional[Mapping[str, Tuple[float, float]]] = None) -> Path:
    """One panel per coefficient (2 x 3 for MADA's six), each against iteration, runs overlaid.

    The trajectories come from the ``coefficients`` of the ``iter`` lines (every ``log_interval``
    iterations); the first point is the initial value, from the ``eval`` line at iteration 0.
    Titles give each coefficient's domain (default: MADA's); a bound that a trajectory reaches is
    drawn as a dotted line (the hyper-step projects onto the domain, so a coefficient can sit there).
    """
    domains = mada_domains() if domains is None else domains
    ncols = 3
    nrows = (len(names) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.0 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, name in enumerate(names):
        ax = axes[k // ncols][k % ncols]
        drawn = False
        for i, (label, run) in enumerate(runs.items()):
            run = _as_log(run)
            recs = [r for r in run["evals"][:1] + run["iters"] if name in (r.get("coefficients") or {})]
            if not recs:
                continue
            values = [r["coefficients"][name] for r in recs]
            ax.plot([r["iter"] for r in recs], values, color=colors[i % len(colors)], lw=1.5, label=label)
            drawn = True
            if name in domains:
                low, high = domains[name]
                for bound in (low, high):
                    if any(abs(v - bound) <= 1e-6 * max(1.0, abs(bound)) for v in values):
                        ax.axhline(bound, color="gray", ls=":", lw=1)
        label = _LABELS.get(name, name)
        if name in domains:
            label += f" in [{domains[name][0]:g}, {domains[name][1]:g}]"
        ax.set_title(label + (f"   ({_MEANING[name]})" if name in _MEANING else ""), fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if drawn:
            if len(runs) > 1:
                ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not learned", ha="center", va="center", transform=ax.transAxes, color="gray")
    for k in range(len(names), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    """``python -m experiments.plots LOG [LOG ...] [--out=DIR]``: losses.png and coefficients.png."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = list(sys.argv[1:] if argv is None else argv)
    out = Path(".")
    paths = []
    for a in args:
        if a.startswith("--out="):
            out = Path(a[len("--out="):])
        elif a.startswith("-"):
            raise SystemExit(f"error: unknown option {a!r}; usage: python -m experiments.plots LOG... [--out=DIR]")
        else:
            paths.append(a)
    if not paths:
        raise SystemExit("usage: python -m experiments.plots LOG [LOG ...] [--out=DIR]")
    runs = {}
    for p in paths:
        lg = read_log(p)
        label = (lg["manifest"] or {}).get("config", {}).get("optimizer") or Path(p).parent.name
        runs[label if label not in runs else f"{label} ({Path(p).parent.name})"] = lg
    written = [plot_losses(runs, out / "losses.png")]
    learned = {k: v for k, v in runs.items() if any(r.get("coefficients") for r in v["iters"])}
    if learned:
        written.append(plot_coefficients(learned, out / "coefficients.png"))
    return written


if __name__ == "__main__":
    main()
