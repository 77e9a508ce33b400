"""Poor initialization (MADA paper, table 3 "Adam- / MADA-" and figure 7): a grid of initial
(beta1, beta2) for Adam, HyperAdam and MADA; heatmaps of final train and final validation loss.

    .venv/bin/python -m experiments.poor_init                 # about 10 minutes on 2 busy cores
    .venv/bin/python -m experiments.poor_init --help

* Adam: ``torch.optim.AdamW`` with the cell's (beta1, beta2) fixed for the whole run (decoupled
  weight decay as the other two, so only the betas differ from MADA's Adam vertex);
* HyperAdam: ``hypergrad.HyperAdam``: beta1, beta2 start at the cell's values and are learned;
* MADA: ``hypergrad.MADA``: beta1, beta2 start at the cell's values, beta3, c, rho, gamma at the
  package defaults, all learned.

The paper's figure 7 plots final **training** loss only; here the final validation loss is shown
next to it, on the same grid, with one colour scale per metric shared by the three optimizers.
Every run uses the same lr, schedule, model, data order (per seed) and eval batches as
``experiments.compare`` (its ``train_one``). Finished runs go to ``<runs_dir>/results.jsonl`` at
once; a rerun skips them. Writes ``docs/poor_init.md`` and ``docs/images/poor_init_heatmaps.png``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from experiments.compare import (LABELS, Results, _train_config, commit_line, get_or_run, machine_info, open_runs,
                                 parse_command_line, versions_line)
from experiments.config import ConfigError
from experiments.data import CharCorpus
from experiments.train import model_config

__all__ = ["PoorInitConfig", "run_grid", "main"]

log = logging.getLogger(__name__)
NAMES = {"adamw": "Adam (torch.optim.AdamW, fixed betas)", "hyperadam": "HyperAdam (learned betas)",
         "mada": "MADA (learned)"}
SHORT = {"adamw": "Adam", "hyperadam": "HyperAdam", "mada": "MADA"}


@dataclass
class PoorInitConfig:
    """Configuration of the poor-initialization grid (``--key=value``)."""

    optimizers: str = field(default="adamw,hyperadam,mada", metadata={"help": "subset of adamw,hyperadam,mada"})
    beta1s: str = field(default="0.5,0.7,0.9", metadata={"help": "initial beta1 values (rows)"})
    beta2s: str = field(default="0.8,0.9,0.99", metadata={"help": "initial beta2 values (columns)"})
    seeds: str = field(default="1", metadata={"help": "seeds (comma separated); heatmaps show the mean"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate of every run"})
    max_iters: int = field(default=300, metadata={"help": "steps per run"})
    model: str = field(default="demo", metadata={"help": "GPT config of experiments.model.CONFIGS"})
    n_layer: Optional[int] = field(default=2, metadata={"help": "override n_layer (none: keep)"})
    n_embd: Optional[int] = field(default=64, metadata={"help": "override n_embd (none: keep)"})
    n_head: Optional[int] = field(default=4, metadata={"help": "override n_head (none: keep)"})
    block_size: Optional[int] = field(default=None, metadata={"help": "override block_size"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    warmup_iters: int = field(default=50, metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a fraction of lr"})
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0: off)"})
    hyper_lr: float = field(default=1e-3, metadata={"help": "hyper-level Adam lr of MADA/HyperAdam"})
    fused: bool = field(default=False, metadata={"help": "unused (no rule optimizers here)"})
    eval_interval: int = field(default=50, metadata={"help": "evaluate every this many steps"})
    eval_iters: int = field(default=8, metadata={"help": "fixed eval batches per split"})
    eval_batch_size: int = field(default=32, metadata={"help": "sequences per eval batch"})
    eval_seed: int = field(default=1234, metadata={"help": "seed of the fixed eval batches"})
    threads: int = field(default=1, metadata={"help": "torch.set_num_threads (0: leave)"})
    runs_dir: str = field(default="runs/poor_init", metadata={"help": "results.jsonl goes here"})
    out: str = field(default="docs/poor_init.md", metadata={"help": "the generated markdown"})
    images_dir: str = field(default="docs/images", metadata={"help": "where poor_init_*.png go"})
    report_only: bool = field(default=False, metadata={"help": "only regenerate the report"})
    beta1: float = 0.9   # per-cell values are substituted by run_grid
    beta2: float = 0.99

    def __post_init__(self):
        bad = [o for o in self.optimizer_list if o not in NAMES]
        if bad:
            raise ConfigError(f"optimizers: unknown {bad}; allowed: {list(NAMES)}")
        if not (self.b1_list and self.b2_list and self.seed_list):
            raise ConfigError("beta1s, beta2s and seeds need at least one value each")
        for b in self.b1_list:
            if not 0.01 <= b <= 0.99:
                raise ConfigError(f"beta1s: {b} outside MADA's domain [0.01, 0.99]")
        for b in self.b2_list:
            if not 0.501 <= b <= 0.99:
                raise ConfigError(f"beta2s: {b} outside MADA's domain [0.501, 0.99]")

    @property
    def optimizer_list(self) -> List[str]:
        return [s.strip() for s in self.optimizers.split(",") if s.strip()]

    @property
    def b1_list(self) -> List[float]:
        return [float(s) for s in self.beta1s.split(",") if s.strip()]

    @property
    def b2_list(self) -> List[float]:
        return [float(s) for s in self.beta2s.split(",") if s.strip()]

    @property
    def seed_list(self) -> List[int]:
        return [int(s) for s in self.seeds.split(",") if s.strip()]


def _phase(b1: float, b2: float) -> str:
    return f"init b1={b1:g} b2={b2:g}"


def run_grid(cfg: PoorInitConfig, corpus: Optional[CharCorpus] = None, argv: Sequence[str] = ()) -> str:
    corpus, results, meta, save_meta = open_runs(cfg, corpus)
    if not cfg.report_only:
        for seed in cfg.seed_list:
            for b1 in cfg.b1_list:
                for b2 in cfg.b2_list:
                    cell = dataclasses.replace(cfg, beta1=b1, beta2=b2)
                    for name in cfg.optimizer_list:
                        get_or_run(results, _phase(b1, b2), name, cfg.lr, seed, cfg.max_iters, cell, corpus,
                                   beta1_init=b1, beta2_init=b2)
                        save_meta()
    save_meta()
    return write_report(cfg, results, meta["elapsed_s"], argv, corpus)


def _grid_values(cfg, results, name, key):
    """(len(b1), len(b2)) list of mean-over-seeds values (None: missing, inf: diverged)."""
    out = []
    for b1 in cfg.b1_list:
        row = []
        for b2 in cfg.b2_list:
            runs = [results.get(_phase(b1, b2), name, cfg.lr, s, cfg.max_iters) for s in cfg.seed_list]
            runs = [r for r in runs if r is not None]
            if not runs:
                row.append(None)
            elif any(r[key] is None for r in runs):
                row.append(float("inf"))
            else:
                row.append(statistics.fmean(r[key] for r in runs))
        out.append(row)
    return out


def _heatmaps(cfg, grids, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = cfg.optimizer_list
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names) + 1.5, 8.0), squeeze=False,
                             constrained_layout=True)
    for i, split in enumerate(("train", "val")):
        mats = {n: np.array([[np.nan if (v is None or math.isinf(v)) else v for v in row]
                             for row in grids[n][split]], dtype=float) for n in names}
        allv = np.concatenate([m.ravel() for m in mats.values()])
        allv = allv[np.isfinite(allv)]
        vmin, vmax = (float(allv.min()), float(allv.max())) if allv.size else (0, 1)
        for j, n in enumerate(names):
            ax = axes[i][j]
            im = ax.imshow(mats[n], cmap="viridis_r", vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
            for a in range(len(cfg.b1_list)):
                for b in range(len(cfg.b2_list)):
                    v = grids[n][split][a][b]
                    txt = "n/a" if v is None else ("div." if math.isinf(v) else f"{v:.3f}")
                    val = mats[n][a, b]
                    dark = np.isfinite(val) and (val - vmin) / max(vmax - vmin, 1e-12) > 0.5
                    ax.text(b, a, txt, ha="center", va="center", fontsize=9, color="white" if dark else "black")
            ax.set_xticks(range(len(cfg.b2_list)))
            ax.set_xticklabels([f"{b:g}" for b in cfg.b2_list])
            ax.set_yticks(range(len(cfg.b1_list)))
            ax.set_yticklabels([f"{b:g}" for b in cfg.b1_list])
            ax.set_xlabel("initial beta2")
            ax.set_ylabel("initial beta1")
            ax.set_title(f"{SHORT[n]}: final {split} loss", fontsize=10)
        fig.colorbar(im, ax=list(axes[i]), shrink=0.9, label=f"final {split} loss (shared scale)")
    fig.suptitle(f"Poor initialization: {cfg.max_iters} steps, lr {cfg.lr:g}, seeds {cfg.seeds} (lower is better)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(cfg: PoorInitConfig, results: Results, elapsed_s: float, argv: Sequence[str],
                 corpus: CharCorpus) -> str:
    names = cfg.optimizer_list
    grids = {n: {s: _grid_values(cfg, results, n, f"final_{s}_loss") for s in ("train", "val")} for n in names}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img = Path(cfg.images_dir) / "poor_init_heatmaps.png"
    _heatmaps(cfg, grids, img)
    gpt = model_config(_train_config(cfg, cfg.max_iters), corpus.vocab_size)
    mi = machine_info()
    L: List[str] = ["# Poor initialization: initial (beta1, beta2) grid\n",
                    "<!-- Generated by experiments/poor_init.py from runs/poor_init/results.jsonl; do not edit by hand. -->\n"]
    shown = [a for a in argv if not a.startswith("--report_only")]
    L.append(f"- command: `{' '.join(['.venv/bin/python -m experiments.poor_init', *shown])}`")
    L.append(f"- git commit: {commit_line()}; versions: {versions_line()}")
    L.append(f"- machine: {mi['cpu_model']}, {mi['cpu_count']} CPUs, {mi['torch_threads']} torch threads; "
             f"total runtime **{elapsed_s / 60:.1f} min**")
    L.append(f"- model: {gpt.n_layer} layers, width {gpt.n_embd}, block {gpt.block_size}, vocab {gpt.vocab_size}; "
             f"seeds {cfg.seeds}")
    L.append("- full configuration: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()
                                                 if k not in ("beta1", "beta2")))
    L.append("- Adam = `torch.optim.AdamW` with the cell's betas fixed; HyperAdam = `hypergrad.HyperAdam` (beta1, "
             "beta2 learned from the cell's values); MADA = `hypergrad.MADA` (beta1, beta2 from the cell, the other "
             "coefficients from the package defaults, all learned). Same lr, schedule, weight decay, data order "
             "and eval batches for all. The paper's figure 7 shows final *training* loss only; both are shown here.\n")
    L.append(f"![poor init heatmaps](images/{img.name})\n" if Path(cfg.images_dir).resolve() == (out.parent / "images").resolve()
             else f"![poor init heatmaps]({os.path.relpath(img, out.parent)})\n")
    for split in ("train", "val"):
        L.append(f"## Final {split} loss (mean over seeds)\n")
        L.append("| initial (beta1, beta2) | " + " | ".join(SHORT[n] for n in names) + " |")
        L.append("|---|" + "---:|" * len(names))
        for a, b1 in enumerate(cfg.b1_list):
            for b, b2 in enumerate(cfg.b2_list):
                cells = []
                for n in names:
                    v = grids[n][split][a][b]
                    cells.append("n/a" if v is None else ("diverged" if math.isinf(v) else f"{v:.4f}"))
                L.append(f"| ({b1:g}, {b2:g}) | " + " | ".join(cells) + " |")
        L.append("")
    learned = [n for n in names if n != "adamw"]
    if learned:
        L.append("## Final learned beta1, beta2 (seed mean)\n")
        L.append("| initial (beta1, beta2) | " + " | ".join(SHORT[n] for n in learned) + " |")
        L.append("|---|" + "---|" * len(learned))
        for b1 in cfg.b1_list:
            for b2 in cfg.b2_list:
                cells = []
                for n in learned:
                    runs = [results.get(_phase(b1, b2), n, cfg.lr, s, cfg.max_iters) for s in cfg.seed_list]
                    runs = [r for r in runs if r is not None and r.get("coefficients")]
                    cells.append("n/a" if not runs else
                                 f"({statistics.fmean(r['coefficients']['beta1'] for r in runs):.3f}, "
                                 f"{statistics.fmean(r['coefficients']['beta2'] for r in runs):.3f})")
                L.append(f"| ({b1:g}, {b2:g}) | " + " | ".join(cells) + " |")
        L.append("")
    L.append("## Summary (generated from the numbers above)\n")
    L.append("| optimizer | mean final train over grid | spread train (max - min) | mean final val over grid | "
             "spread val (max - min) |")
    L.append("|---|---:|---:|---:|---:|")
    summ = {}
    for n in names:
        row = []
        for split in ("train", "val"):
            vals = [v for r in grids[n][split] for v in r if v is not None]
            if not vals or any(math.isinf(v) for v in vals):
                row.append((float("inf"), float("nan")))
            else:
                row.append((statistics.fmean(vals), max(vals) - min(vals)))
        summ[n] = row
        L.append(f"| {SHORT[n]} | {row[0][0]:.4f} | {row[0][1]:.4f} | {row[1][0]:.4f} | {row[1][1]:.4f} |")
    L.append("")
    for k, split in enumerate(("train", "val")):
        best = min(names, key=lambda n: summ[n][k][0])
        robust = min(names, key=lambda n: summ[n][k][1] if math.isfinite(summ[n][k][1]) else float("inf"))
        L.append(f"- By final **{split}** loss: lowest grid mean {SHORT[best]}, smallest spread across initial betas "
                 f"{SHORT[robust]}.")
        if "mada" in names and "adamw" in names:
            wins = sum(1 for a in range(len(cfg.b1_list)) for b in range(len(cfg.b2_list))
                       if grids["mada"][split][a][b] is not None and grids["adamw"][split][a][b] is not None
                       and grids["mada"][split][a][b] < grids["adamw"][split][a][b])
            L.append(f"  MADA below Adam in {wins} of {len(cfg.b1_list) * len(cfg.b2_list)} cells.")
    try:
        import optimizers
        hi = float(optimizers.get_rule("mada").coefficients["beta2"].domain.high)
    except (AttributeError, KeyError):
        hi = None
    if hi is not None:
        for n in learned:
            at = [(r["beta1_init"], r["beta2_init"]) for r in results.rows
                  if r["optimizer"] == n and r.get("coefficients") and r["max_iters"] == cfg.max_iters
                  and r["coefficients"]["beta2"] >= hi - 5e-4]
            if at:
                L.append(f"- {SHORT[n]}: learned beta2 ended within 5e-4 of its domain's upper bound {hi:g} in "
                         f"{len(at)} run(s), initial (beta1, beta2) = "
                         + ", ".join(f"({a:g}, {b:g})" for a, b in sorted(set(at))) + ".")
    L.append(f"- {len(cfg.seed_list)} seed(s) per cell: differences of a few 0.01 nats between cells are within "
             "seed noise (see the std column of docs/results.md for the size of that noise).\n")
    text = "\n".join(L) + "\n"
    out.write_text(text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> str:
    cfg, argv = parse_command_line(PoorInitConfig, argv)
    text = run_grid(cfg, argv=argv)
    log.info("wrote %s", cfg.out)
    return text


if __name__ == "__main__":
    main()
