"""Comparison suite: MADA, HyperAdam and the classic optimizers on the char-level GPT, each at its own
best learning rate, several seeds; writes ``docs/results.md`` and ``docs/images/results_*.png``.

    .venv/bin/python -m experiments.compare                       # the full suite (about an hour, 2 cores)
    .venv/bin/python -m experiments.compare --help                # every option

Optimizers (``--optimizers``, comma separated):

==========  ==================================================================================
adamw       ``torch.optim.AdamW``: the baseline
adam        ``torch.optim.Adam`` without weight decay (AdamW minus the decoupled decay)
amsgrad,    our rules through ``optimizers.build_optimizer`` (fixed coefficients, decoupled weight
avgrad,     decay; ``--fused=true`` for ``RuleOptimizer(fused=True)``, off by default: slower
adan,       at this size); Adam-convention rules take ``--beta1/--beta2``; Lion keeps its own betas (0.9, 0.99) and is swept around a
yogi, lion  10x smaller learning rate (Lion's paper: 3-10x smaller than AdamW's)
mada        ``hypergrad.MADA`` (learns beta1, beta2, beta3, c, rho, gamma; hyper-level Adam)
hyperadam   ``hypergrad.HyperAdam`` (learns beta1, beta2)
sf_adamw    ``schedulefree.AdamWScheduleFree`` (``train()``/``eval()`` called around evaluation;
            no external schedule: its own warm-up, constant lr)
prodigy     ``prodigyopt.Prodigy`` (lr is a multiplier of its estimated step size, centre 1.0;
            bias correction and safeguard warm-up on; cosine schedule as the others)
==========  ==================================================================================

Protocol. Every run uses the same model config, the same warm-up + cosine schedule (except
Schedule-Free), gradient clipping and weight decay on matrices only (``experiments.model.param_groups``).
For a seed, every optimizer starts from the same initial weights and sees the same training batches in
the same order (as ``experiments.train.run``: model init and batches seeded by the seed); every run is
scored on the same fixed eval batches. (1) LR sweep: a small grid around each optimizer's centre, one
seed, ``sweep_iters`` steps; the best lr is the one with the lowest **final validation loss** (a
diverged run counts as +inf). (2) Main runs: each optimizer at its best lr, ``max_iters`` steps, every
seed of ``--seeds``. Reported: mean +- std over seeds of final and best train/val loss (equal steps),
and the loss each optimizer had reached by a common training-time budget (equal wall-clock, read from
each run's logged (training seconds, loss) trajectory at the last evaluation within the budget).

Every finished run is appended to ``<runs_dir>/results.jsonl`` at once; a rerun with the same
configuration skips runs already there (resumable). The markdown and plots are generated from that
file only: no number is typed by hand.

No hook of ``experiments.train.run`` takes an optimizer factory, so this module has its own thin
training loop (``train_one``) reusing ``experiments.model``, ``experiments.data`` and
``experiments.train.evaluate`` / ``fixed_batches`` / ``lr_lambda`` with the same seeding as ``run``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import hypergrad
import optimizers
from experiments.config import ConfigError, TrainConfig, exit_on_config_error, parse_config
from experiments.data import CharCorpus, load_shakespeare
from experiments.model import GPT, count_parameters, param_groups
from experiments.train import ADAM_CONVENTION, evaluate, fixed_batches, git_commit, lr_lambda, model_config

__all__ = ["CompareConfig", "OPTIMIZERS", "build", "train_one", "run_suite", "main", "machine_info"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
RULES_USED = ("amsgrad", "avgrad", "adan", "yogi", "lion")
DEFAULT_OPTIMIZERS = "mada,hyperadam,adam,adamw,amsgrad,avgrad,adan,yogi,lion,sf_adamw,prodigy"
LABELS = {"mada": "MADA", "hyperadam": "HyperAdam", "adam": "Adam", "adamw": "AdamW", "amsgrad": "AMSGrad",
          "avgrad": "AVGrad", "adan": "Adan", "yogi": "Yogi", "lion": "Lion", "sf_adamw": "Schedule-Free AdamW",
          "prodigy": "Prodigy"}
SOURCES = {"mada": "hypergrad.MADA", "hyperadam": "hypergrad.HyperAdam", "adam": "torch.optim.Adam",
           "adamw": "torch.optim.AdamW", "sf_adamw": "schedulefree.AdamWScheduleFree",
           "prodigy": "prodigyopt.Prodigy", **{r: f"optimizers.build_optimizer({r!r})" for r in RULES_USED}}


@dataclass
class CompareConfig:
    """Everything the comparison suite depends on (``--key=value``)."""

    optimizers: str = field(default=DEFAULT_OPTIMIZERS, metadata={"help": "comma-separated optimizer names"})
    seeds: str = field(default="1,2,3", metadata={"help": "seeds of the main runs (comma separated)"})
    sweep_seed: int = field(default=0, metadata={"help": "seed of the LR sweep runs"})
    lr_factors: str = field(default="0.33,1,3", metadata={"help": "LR grid = centre times these factors"})
    base_lr: float = field(default=3e-3, metadata={"help": "LR centre of the Adam-like optimizers"})
    lion_lr_ratio: float = field(default=0.1, metadata={"help": "Lion's centre = base_lr times this"})
    prodigy_lr: float = field(default=1.0, metadata={"help": "Prodigy's centre (a multiplier of its d)"})
    max_iters: int = field(default=500, metadata={"help": "steps of each main run"})
    sweep_iters: int = field(default=250, metadata={"help": "steps of each sweep run"})
    model: str = field(default="demo", metadata={"help": "GPT config of experiments.model.CONFIGS"})
    n_layer: Optional[int] = field(default=2, metadata={"help": "override the model's n_layer (none: keep)"})
    n_embd: Optional[int] = field(default=64, metadata={"help": "override the model's n_embd (none: keep)"})
    n_head: Optional[int] = field(default=4, metadata={"help": "override the model's n_head (none: keep)"})
    block_size: Optional[int] = field(default=None, metadata={"help": "override the model's block_size"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    warmup_iters: int = field(default=50, metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a fraction of lr"})
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled weight decay on matrices (not Adam)"})
    beta1: float = field(default=0.9, metadata={"help": "beta1 of Adam-convention optimizers (initial where learned)"})
    beta2: float = field(default=0.99, metadata={"help": "beta2 of Adam-convention optimizers (initial where learned)"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0: off)"})
    hyper_lr: float = field(default=1e-3, metadata={"help": "hyper-level Adam lr of MADA/HyperAdam"})
    fused: bool = field(default=False, metadata={"help": "RuleOptimizer(fused=True) for our rules (slower at this size, see README)"})
    eval_interval: int = field(default=50, metadata={"help": "evaluate train and val loss every this many steps"})
    eval_iters: int = field(default=8, metadata={"help": "fixed eval batches per split"})
    eval_batch_size: int = field(default=32, metadata={"help": "sequences per eval batch"})
    eval_seed: int = field(default=1234, metadata={"help": "seed of the fixed eval batches"})
    threads: int = field(default=1, metadata={"help": "torch.set_num_threads (0: leave); 1 is much faster on a busy 2-core machine"})
    runs_dir: str = field(default="runs/compare", metadata={"help": "results.jsonl goes here"})
    out: str = field(default="docs/results.md", metadata={"help": "the generated markdown"})
    images_dir: str = field(default="docs/images", metadata={"help": "where results_*.png go"})
    poor_init_md: str = field(default="docs/poor_init.md", metadata={"help": "linked from the results if present"})
    report_only: bool = field(default=False, metadata={"help": "only regenerate the markdown/plots from results.jsonl"})

    def __post_init__(self):
        for name in ("max_iters", "sweep_iters", "batch_size", "eval_interval", "eval_iters", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        unknown = [o for o in self.optimizer_list if o not in LABELS]
        if unknown:
            raise ConfigError(f"optimizers: unknown {unknown}; allowed: {list(LABELS)}")
        if not self.seed_list:
            raise ConfigError("seeds: need at least one")
        if not self.factor_list or any(f <= 0 for f in self.factor_list):
            raise ConfigError(f"lr_factors={self.lr_factors!r}: need positive numbers")

    @property
    def optimizer_list(self) -> List[str]:
        return [s.strip() for s in self.optimizers.split(",") if s.strip()]

    @property
    def seed_list(self) -> List[int]:
        return [int(s) for s in self.seeds.split(",") if s.strip()]

    @property
    def factor_list(self) -> List[float]:
        return [float(s) for s in self.lr_factors.split(",") if s.strip()]

    def centre(self, name: str) -> float:
        if name == "lion":
            return self.base_lr * self.lion_lr_ratio
        if name == "prodigy":
            return self.prodigy_lr
        return self.base_lr

    def grid(self, name: str) -> List[float]:
        return [float(f"{self.centre(name) * f:.3g}") for f in self.factor_list]


# ------------------------------------------------------------------------------------------ optimizers
def build(name: str, model: torch.nn.Module, lr: float, cfg) -> torch.optim.Optimizer:
    """Optimizer ``name`` over ``model`` (weight decay on matrices only), see the module docstring.

    ``cfg`` needs ``weight_decay, beta1, beta2, hyper_lr, warmup_iters, fused``.
    """
    wd = cfg.weight_decay
    betas = (cfg.beta1, cfg.beta2)
    if name == "adam":
        return torch.optim.Adam(param_groups(model, 0.0), lr=lr, betas=betas)
    groups = param_groups(model, wd)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=wd)
    if name in ("mada", "hyperadam"):
        cls = hypergrad.MADA if name == "mada" else hypergrad.HyperAdam
        return cls(groups, lr=lr, weight_decay=wd, tower=hypergrad.Level("adam", lr=cfg.hyper_lr),
                   beta1=cfg.beta1, beta2=cfg.beta2)
    if name in RULES_USED:
        kw = {"beta1": cfg.beta1, "beta2": cfg.beta2} if name in ADAM_CONVENTION else {}
        return optimizers.build_optimizer(name, groups, lr=lr, weight_decay=wd, weight_decay_mode="decoupled",
                                          fused=bool(getattr(cfg, "fused", False)), **kw)
    if name == "sf_adamw":
        import schedulefree
        return schedulefree.AdamWScheduleFree(groups, lr=lr, betas=betas, weight_decay=wd,
                                              warmup_steps=cfg.warmup_iters)
    if name == "prodigy":
        import prodigyopt
        return prodigyopt.Prodigy(groups, lr=lr, betas=betas, weight_decay=wd, decouple=True,
                                  use_bias_correction=True, safeguard_warmup=True)
    raise ValueError(f"unknown optimizer {name!r}")


def _train_config(cfg, max_iters: int) -> TrainConfig:
    """A ``TrainConfig`` carrying the model/schedule fields (for ``model_config`` and ``lr_lambda``)."""
    return TrainConfig(model=cfg.model, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                       block_size=cfg.block_size, batch_size=cfg.batch_size, warmup_iters=cfg.warmup_iters,
                       min_lr_ratio=cfg.min_lr_ratio, max_iters=max_iters, progress=False, checkpoint=False)


# ------------------------------------------------------------------------------------------ one run
def train_one(name: str, lr: float, seed: int, max_iters: int, cfg, corpus: CharCorpus,
              build_fn: Callable[[str, torch.nn.Module, float, Any], torch.optim.Optimizer] = build
              ) -> Dict[str, Any]:
    """Train one GPT with optimizer ``name``; return the summary with the eval trajectory.

    Seeding as ``experiments.train.run``: ``torch.manual_seed(seed)`` before the model is built, and
    the training batches from their own generator seeded with ``seed``, so every optimizer of a seed
    starts from the same weights and sees the same batches; eval batches depend on ``eval_seed`` only.
    ``train_s`` counts forward, backward, clipping and the optimizer step (not evaluation).
    """
    tcfg = _train_config(cfg, max_iters)
    gpt = model_config(tcfg, corpus.vocab_size)
    T = gpt.block_size
    torch.manual_seed(seed)
    model = GPT(gpt)
    model.train()
    data_gen = torch.Generator().manual_seed(seed)
    eval_sets = {split: fixed_batches(corpus, split, cfg.eval_iters, cfg.eval_batch_size, T, cfg.eval_seed + i)
                 for i, split in enumerate(("train", "val"))}
    opt = build_fn(name, model, lr, cfg)
    schedule_free = hasattr(opt, "train") and hasattr(opt, "eval") and callable(getattr(opt, "eval"))
    sched = None if schedule_free else torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg))
    hyper = isinstance(opt, hypergrad.HyperOptimizer)
    if schedule_free:
        opt.train()

    traj: List[Dict[str, Any]] = []
    train_s = 0.0
    diverged = False
    done = 0

    def do_eval(iteration: int):
        if schedule_free:
            opt.eval()   # evaluate at the averaged point x, as the package prescribes
        rec = {"iter": iteration, "train_s": train_s,
               **{f"{s}_loss": evaluate(model, b) for s, b in eval_sets.items()}}
        if schedule_free:
            opt.train()
        if hyper:
            rec["coefficients"] = {k: float(v) for k, v in opt.coefficients().items()}
        traj.append(rec)

    do_eval(0)
    for it in range(max_iters):
        t0 = time.perf_counter()
        x, y = corpus.get_batch("train", cfg.batch_size, T, data_gen)
        _, loss = model(x, y)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        train_s += time.perf_counter() - t0
        done = it + 1
        if not math.isfinite(loss.item()):
            diverged = True
            log.warning("%s lr=%g seed=%d: non-finite loss at step %d; stopping", name, lr, seed, done)
            break
        if done % cfg.eval_interval == 0 or done == max_iters:
            do_eval(done)
    if diverged:
        do_eval(done)

    def clean(v):
        return v if v is not None and math.isfinite(v) else None

    for rec in traj:
        rec["train_loss"], rec["val_loss"] = clean(rec["train_loss"]), clean(rec["val_loss"])

    def best(split):
        vals = [r[f"{split}_loss"] for r in traj if r[f"{split}_loss"] is not None]
        return min(vals) if vals else None

    return {
        "optimizer": name, "lr": lr, "seed": seed, "iters_done": done, "max_iters": max_iters,
        "diverged": diverged or traj[-1]["val_loss"] is None,
        "n_params": count_parameters(model),
        "final_train_loss": traj[-1]["train_loss"], "final_val_loss": traj[-1]["val_loss"],
        "best_train_loss": best("train"), "best_val_loss": best("val"),
        "train_s": train_s, "ms_per_step": 1e3 * train_s / max(done, 1),
        "coefficients": traj[-1].get("coefficients", {}),
        "trajectory": traj,
    }


# ------------------------------------------------------------------------------------------ results file
def fingerprint(cfg) -> str:
    """Hash of the fields a run's numbers depend on (not the output paths, seeds list or grid)."""
    skip = {"optimizers", "seeds", "lr_factors", "runs_dir", "out", "images_dir", "poor_init_md", "report_only",
            "threads", "base_lr", "lion_lr_ratio", "prodigy_lr", "sweep_seed", "max_iters", "sweep_iters",
            "grid", "beta1s", "beta2s", "lrs", "heat_optimizers"}
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


class Results:
    """Append-only JSONL of finished runs, keyed by (phase, optimizer, lr, seed, iters, fingerprint)."""

    def __init__(self, path: Path, fp: str):
        self.path, self.fp = path, fp
        self.rows: List[Dict[str, Any]] = []
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("fingerprint") == fp:
                        self.rows.append(row)

    @staticmethod
    def key(phase, name, lr, seed, iters):
        return (phase, name, float(f"{lr:.6g}"), int(seed), int(iters))

    def get(self, phase, name, lr, seed, iters) -> Optional[Dict[str, Any]]:
        k = self.key(phase, name, lr, seed, iters)
        for row in self.rows:
            if self.key(row["phase"], row["optimizer"], row["lr"], row["seed"], row["max_iters"]) == k:
                return row
        return None

    def add(self, row: Dict[str, Any]) -> None:
        row = {**row, "fingerprint": self.fp}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        self.rows.append(row)


def get_or_run(results: Results, phase: str, name: str, lr: float, seed: int, iters: int, cfg,
               corpus: CharCorpus, **extra) -> Dict[str, Any]:
    row = results.get(phase, name, lr, seed, iters)
    if row is not None:
        log.info("skip %s %s lr=%g seed=%d (already in %s)", phase, name, lr, seed, results.path)
        return row
    t0 = time.perf_counter()
    row = {"phase": phase, **extra, **train_one(name, lr, seed, iters, cfg, corpus)}
    row["wall_s"] = time.perf_counter() - t0
    results.add(row)
    log.info("%s %-9s lr=%-8g seed=%d: final train %.4f val %.4f, %.0f ms/step, %.0f s", phase, name, lr, seed,
             row["final_train_loss"] or float("nan"), row["final_val_loss"] or float("nan"), row["ms_per_step"],
             row["wall_s"])
    return row


def open_runs(cfg, corpus: Optional[CharCorpus] = None
              ) -> Tuple[CharCorpus, Results, Dict[str, Any], Callable[[], None]]:
    """What a resumable suite (this one, ``experiments.poor_init``) starts with: ``cfg.threads``, the
    corpus (loaded unless given), the ``Results`` of ``<runs_dir>/results.jsonl`` and the ``meta`` of
    ``<runs_dir>/meta.json``; returns ``(corpus, results, meta, save_meta)``.

    ``meta["elapsed_s"]`` is the time of every invocation with this fingerprint, summed (a rerun
    continues the count; another fingerprint starts it at 0); ``save_meta()`` brings it up to this
    moment and writes ``meta`` (called after every run, so a killed suite keeps its time).
    """
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = load_shakespeare() if corpus is None else corpus
    runs_dir = Path(cfg.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    results = Results(runs_dir / "results.jsonl", fingerprint(cfg))
    meta_path = runs_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("fingerprint") != results.fp:
        meta = {"fingerprint": results.fp, "elapsed_s": 0.0}
    prior_elapsed = float(meta.get("elapsed_s", 0.0))

    def save_meta():
        meta["elapsed_s"] = prior_elapsed + (time.perf_counter() - t_start)
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    return corpus, results, meta, save_meta


# ------------------------------------------------------------------------------------------ statistics
def mean_std(values: Sequence[Optional[float]]) -> Tuple[float, float]:
    vals = [float("inf") if v is None else v for v in values]
    if not vals:
        return float("nan"), float("nan")
    if any(math.isinf(v) for v in vals):
        return float("inf"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(m: float, s: float, digits: int = 4) -> str:
    if math.isinf(m):
        return "diverged"
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def score(row) -> float:
    v = row["final_val_loss"]
    return float("inf") if v is None or row["diverged"] else v


def loss_at_time(traj: Sequence[Dict[str, Any]], budget: float, split: str) -> Tuple[Optional[float], int]:
    """(loss, iter) at the last evaluation whose cumulative training time is within ``budget``."""
    within = [r for r in traj if r["train_s"] <= budget + 1e-9]
    r = within[-1]
    return r[f"{split}_loss"], r["iter"]


# ------------------------------------------------------------------------------------------ machine
def machine_info() -> Dict[str, Any]:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def versions_line() -> str:
    from importlib import metadata
    out = []
    for dist in ("torch", "schedulefree", "prodigyopt", "numpy", "matplotlib"):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def commit_line() -> str:
    g = git_commit()
    if g["commit"] is None:
        return "unknown"
    return f"`{g['commit']}`" + (" (working tree with uncommitted changes)" if g["dirty"] else "")


# ------------------------------------------------------------------------------------------ the suite
def run_suite(cfg: CompareConfig, corpus: Optional[CharCorpus] = None, argv: Sequence[str] = ()) -> Dict[str, Any]:
    """Sweep, main runs, then the report; returns ``{"best_lr", "main", "md"}``."""
    corpus, results, meta, save_meta = open_runs(cfg, corpus)
    meta["argv"] = list(argv)   # the command of the latest invocation, written with the time
    names = cfg.optimizer_list
    if not cfg.report_only:
        for name in names:                                   # (1) LR sweep
            for lr in cfg.grid(name):
                get_or_run(results, "sweep", name, lr, cfg.sweep_seed, cfg.sweep_iters, cfg, corpus)
                save_meta()
    best_lr = {}
    for name in names:
        rows = [r for r in results.rows if r["phase"] == "sweep" and r["optimizer"] == name
                and r["max_iters"] == cfg.sweep_iters and r["seed"] == cfg.sweep_seed
                and float(f"{r['lr']:.6g}") in cfg.grid(name)]
        if rows:
            best_lr[name] = min(rows, key=lambda r: (score(r), r["lr"]))["lr"]
    if not cfg.report_only:
        for seed in cfg.seed_list:                          # (2) main runs, seed-major: all optimizers per seed
            for name in names:
                if name in best_lr:
                    get_or_run(results, "main", name, best_lr[name], seed, cfg.max_iters, cfg, corpus)
                    save_meta()
    save_meta()
    md = write_report(cfg, results, best_lr, meta["elapsed_s"], argv, corpus)
    log.info("wrote %s (suite time so far %.1f min)", cfg.out, meta["elapsed_s"] / 60)
    return {"best_lr": best_lr, "md": md}


# ------------------------------------------------------------------------------------------ report
def _main_rows(cfg, results, best_lr) -> Dict[str, List[Dict[str, Any]]]:
    out = {}
    for name in cfg.optimizer_list:
        if name not in best_lr:
            continue
        rows = [r for r in results.rows if r["phase"] == "main" and r["optimizer"] == name
                and r["max_iters"] == cfg.max_iters and r["seed"] in cfg.seed_list
                and math.isclose(r["lr"], best_lr[name], rel_tol=1e-9)]
        if rows:
            out[name] = sorted(rows, key=lambda r: r["seed"])
    return out


def _plots(cfg, main: Dict[str, List[Dict[str, Any]]]) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    img = Path(cfg.images_dir)
    img.mkdir(parents=True, exist_ok=True)
    paths = []
    names = list(main)
    cmap = plt.get_cmap("tab20")
    colors = {n: cmap(i % 20) for i, n in enumerate(names)}

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for split, ax in zip(("val", "train"), axes):
        for n in names:
            trajs = [r["trajectory"] for r in main[n]]
            L = min(len(t) for t in trajs)
            its = np.array([t["iter"] for t in trajs[0][:L]])
            vals = np.array([[np.nan if t[i][f"{split}_loss"] is None else t[i][f"{split}_loss"] for i in range(L)]
                             for t in trajs])
            m, s = np.nanmean(vals, 0), np.nanstd(vals, 0)
            ax.plot(its, m, color=colors[n], label=LABELS[n], lw=2.6 if n in ("mada", "adamw") else 1.3)
            ax.fill_between(its, m - s, m + s, color=colors[n], alpha=0.2)
        finals = [statistics.fmean(r[f"final_{split}_loss"] for r in main[n]) for n in names
                  if all(r[f"final_{split}_loss"] is not None for r in main[n])]
        if finals:
            lo, hi = min(finals), max(finals)
            ax.set_ylim(lo - 0.15, hi + 0.6)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{split} loss (nats/char)")
        ax.set_title(f"{split} loss, mean ± std over seeds {cfg.seeds} (MADA, AdamW bold)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = img / "results_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p.name)

    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(names) + 2), 4.5))
    x = np.arange(len(names))
    w = 0.38
    for k, (split, hatch) in enumerate((("train", ""), ("val", "//"))):
        ms = [mean_std([r[f"final_{split}_loss"] for r in main[n]]) for n in names]
        means = [m if math.isfinite(m) else np.nan for m, _ in ms]
        stds = [s if math.isfinite(s) else 0 for _, s in ms]
        ax.bar(x + (k - 0.5) * w, means, w, yerr=stds, capsize=3, label=f"final {split}", hatch=hatch,
               color=[colors[n] for n in names], edgecolor="k", alpha=0.9 if split == "train" else 0.55)
    finite = [statistics.fmean(r[f"final_{s}_loss"] for r in main[n]) for n in names for s in ("train", "val")
              if all(r[f"final_{s}_loss"] is not None for r in main[n])]
    tops = [sum(mean_std([r[f"final_{s}_loss"] for r in main[n]])) for n in names for s in ("train", "val")
            if all(r[f"final_{s}_loss"] is not None for r in main[n])]
    if finite:
        ax.set_ylim(min(finite) - 0.1, max(tops) + 0.05)
    ax.set_xticks(x)
    ax.set_xticklabels([LABELS[n] for n in names], rotation=30, ha="right")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title(f"final train (solid) and val (hatched) loss after {cfg.max_iters} steps, mean ± std")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = img / "results_final_bars.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p.name)

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for n in names:
        for j, r in enumerate(main[n]):
            t = [q["train_s"] for q in r["trajectory"] if q["val_loss"] is not None]
            v = [q["val_loss"] for q in r["trajectory"] if q["val_loss"] is not None]
            ax.plot(t, v, color=colors[n], lw=1, alpha=0.8, label=LABELS[n] if j == 0 else None)
    if finite:
        ax.set_ylim(min(finite) - 0.15, max(finite) + 0.8)
    ax.set_xlabel("training time (s, excluding evaluation)")
    ax.set_ylabel("val loss (nats/char)")
    ax.set_title("val loss against training time (every seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = img / "results_val_vs_time.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p.name)
    return paths


def write_report(cfg: CompareConfig, results: Results, best_lr: Dict[str, float], elapsed_s: float,
                 argv: Sequence[str], corpus: CharCorpus) -> str:
    main = _main_rows(cfg, results, best_lr)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img_rel = os.path.relpath(Path(cfg.images_dir), out.parent)
    tcfg = _train_config(cfg, cfg.max_iters)
    gpt = model_config(tcfg, corpus.vocab_size)
    any_row = next(iter(results.rows), None)
    n_params = any_row["n_params"] if any_row else None
    L: List[str] = []
    L.append("# Optimizer comparison on the char-level GPT\n")
    L.append("<!-- Generated by experiments/compare.py from runs/compare/results.jsonl; do not edit by hand: rerun it. -->\n")
    cmd = " ".join([".venv/bin/python -m experiments.compare", *[a for a in argv if not a.startswith("--report_only")]])
    L.append(f"- command: `{cmd}`")
    L.append(f"- git commit when this report was written: {commit_line()}")
    L.append(f"- versions: {versions_line()}")
    mi = machine_info()
    L.append(f"- machine: {mi['cpu_model']}, {mi['cpu_count']} CPUs, {mi['torch_threads']} torch threads, "
             f"{mi['platform']}, python {mi['python']}")
    L.append(f"- total runtime of the suite (sweep + main runs, summed over invocations): "
             f"**{elapsed_s / 60:.1f} min**")
    L.append(f"- model: `{cfg.model}` GPT ({gpt.n_layer} layers, {gpt.n_head} heads, width {gpt.n_embd}, "
             f"block {gpt.block_size}, vocab {gpt.vocab_size}, dropout {gpt.dropout}), {n_params} parameters; "
             f"offline Shakespeare ({len(corpus.train)} train / {len(corpus.val)} val characters)")
    L.append(f"- seeds: sweep seed {cfg.sweep_seed}; main-run seeds {cfg.seeds}")
    L.append(f"- full configuration: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()
                                                  if k != "report_only"))
    L.append("- losses are cross-entropy in nats per character on fixed eval batches "
             f"({cfg.eval_iters} x {cfg.eval_batch_size} sequences per split, the same for every run), "
             f"measured every {cfg.eval_interval} steps; *best* is the minimum over those evaluations.\n")
    L.append("## Protocol\n")
    L.append("Same initial weights and same training batches in the same order for every optimizer of a seed. "
             f"Linear warm-up ({cfg.warmup_iters} steps) then cosine to {cfg.min_lr_ratio} x lr for every optimizer "
             "except Schedule-Free AdamW (its own warm-up, constant lr, evaluated after `eval()`). Gradient clipping "
             f"at {cfg.grad_clip}. Decoupled weight decay {cfg.weight_decay} on matrices only "
             "(`experiments.model.param_groups`); Adam is `torch.optim.Adam` with no weight decay. "
             f"Betas ({cfg.beta1}, {cfg.beta2}) for every Adam-convention optimizer (initial values where learned); "
             f"Lion keeps (0.9, 0.99). MADA/HyperAdam: hyper-level Adam with lr {cfg.hyper_lr}. "
             f"Our rules run with `fused={cfg.fused}`.\n")
    L.append("Optimizer sources: " + "; ".join(f"{LABELS[n]} = `{SOURCES[n]}`" for n in cfg.optimizer_list) + ".\n")

    # ---- sweep table
    L.append("## Learning-rate sweep\n")
    L.append(f"One seed ({cfg.sweep_seed}), {cfg.sweep_iters} steps per run (schedule over those steps), grid = "
             f"centre x ({cfg.lr_factors}). **The best lr is chosen by the lowest final validation loss.** "
             "A best lr at the edge of its grid is marked *edge*: the optimum may lie outside.\n")
    L.append("| optimizer | lr | final train | final val | ms/step | |")
    L.append("|---|---:|---:|---:|---:|---|")
    for name in cfg.optimizer_list:
        grid = cfg.grid(name)
        for lr in grid:
            r = results.get("sweep", name, lr, cfg.sweep_seed, cfg.sweep_iters)
            if r is None:
                L.append(f"| {LABELS[name]} | {lr:g} | not run | | | |")
                continue
            mark = ""
            if name in best_lr and math.isclose(lr, best_lr[name], rel_tol=1e-9):
                mark = "**best**" + (" (edge)" if lr in (grid[0], grid[-1]) and len(grid) > 1 else "")
            ft = "diverged" if r["final_train_loss"] is None else f"{r['final_train_loss']:.4f}"
            fv = "diverged" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}"
            L.append(f"| {LABELS[name]} | {lr:g} | {ft} | {fv} | {r['ms_per_step']:.0f} | {mark} |")
    L.append("")

    # ---- main table
    L.append(f"## Equal steps: {cfg.max_iters} steps, mean ± std over seeds\n")
    if not main:
        L.append("No main runs yet.\n")
    else:
        L.append("| optimizer | lr | seeds | final train | final val | best train | best val | ms/step |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        stats = {}
        for name, rows in main.items():
            st = {k: mean_std([r[k] for r in rows]) for k in
                  ("final_train_loss", "final_val_loss", "best_train_loss", "best_val_loss", "ms_per_step")}
            stats[name] = st
            L.append(f"| {LABELS[name]} | {best_lr[name]:g} | {len(rows)} | {fmt(*st['final_train_loss'])} | "
                     f"{fmt(*st['final_val_loss'])} | {fmt(*st['best_train_loss'])} | {fmt(*st['best_val_loss'])} | "
                     f"{st['ms_per_step'][0]:.0f} ± {st['ms_per_step'][1]:.0f} |")
        L.append("")
        hyper_coefs = {n: rows for n, rows in main.items() if rows[0].get("coefficients")}
        if hyper_coefs:
            L.append("Final learned coefficients (mean over seeds):\n")
            for n, rows in hyper_coefs.items():
                keys = list(rows[0]["coefficients"])
                L.append(f"- {LABELS[n]}: " + ", ".join(
                    f"{k} {statistics.fmean(r['coefficients'][k] for r in rows):.3f}" for k in keys))
            L.append("")

        # ---- wall-clock table
        totals = {n: statistics.fmean(r["train_s"] for r in rows) for n, rows in main.items()}
        fastest = min(totals, key=totals.get)
        budget = totals[fastest]
        L.append(f"## Equal wall-clock: training-time budget {budget:.1f} s\n")
        L.append(f"The budget is the mean total training time of the fastest optimizer ({LABELS[fastest]}). For each "
                 "run, the loss is read at the last evaluation whose cumulative training time (forward, backward, "
                 "clipping and step; evaluation excluded) is within the budget, then averaged over seeds. Wall times "
                 "on a shared 2-core machine are noisy (other processes, thermal state, first-step compilation of "
                 "fused kernels and `torch.func` graphs): read differences of less than ~10-20 % as ties.\n")
        L.append("| optimizer | mean total train time (s) | steps reached | train loss at budget | val loss at budget |")
        L.append("|---|---:|---:|---:|---:|")
        wall = {}
        for name, rows in main.items():
            tr = [loss_at_time(r["trajectory"], budget, "train") for r in rows]
            va = [loss_at_time(r["trajectory"], budget, "val") for r in rows]
            steps = statistics.fmean(i for _, i in va)
            wall[name] = (mean_std([v for v, _ in tr]), mean_std([v for v, _ in va]), steps)
            L.append(f"| {LABELS[name]} | {totals[name]:.1f} | {steps:.0f} | {fmt(*wall[name][0])} | "
                     f"{fmt(*wall[name][1])} |")
        L.append("")

        # ---- plots
        paths = _plots(cfg, main)
        L.append("## Plots\n")
        for p in paths:
            L.append(f"![{p}]({img_rel}/{p})\n")

        # ---- discussion
        L.append("## Discussion (generated from the numbers above)\n")
        L.extend(discussion(main, stats, wall, best_lr, fastest, len(cfg.factor_list)))
        for n in ("mada", "hyperadam"):
            if n in main and "adamw" in main:
                pairs = []
                for lr in cfg.grid("adamw"):
                    a_, b_ = (results.get("sweep", m, lr, cfg.sweep_seed, cfg.sweep_iters) for m in (n, "adamw"))
                    if a_ and b_ and a_["final_val_loss"] is not None and b_["final_val_loss"] is not None:
                        pairs.append(f"lr {lr:g}: {a_['final_val_loss'] - b_['final_val_loss']:+.4f}")
                if pairs:
                    L.insert(len(L) - 1, f"- {LABELS[n]} minus AdamW at the *same* lr in the sweep (seed "
                             f"{cfg.sweep_seed}, {cfg.sweep_iters} steps, final val): " + "; ".join(pairs) + ".")
        edges = [LABELS[n] for n in main if len(cfg.grid(n)) > 1
                 and any(math.isclose(best_lr[n], g, rel_tol=1e-9) for g in (cfg.grid(n)[0], cfg.grid(n)[-1]))]
        if edges:
            L.insert(len(L) - 1, "- Best lr at the edge of its sweep grid (the optimum may lie outside, so these "
                     "optimizers may be under-tuned): " + ", ".join(edges) + ".")
    pim = Path(cfg.poor_init_md)
    if pim.exists():
        L.append("## Poor initialization\n")
        L.append(f"See [{pim.name}]({os.path.relpath(pim, out.parent)}) (generated by `experiments/poor_init.py`): "
                 "Adam, HyperAdam and MADA started from a grid of initial (beta1, beta2), heatmaps of final train "
                 "and final validation loss side by side.\n")
    text = "\n".join(L) + "\n"
    out.write_text(text)
    return text


def discussion(main, stats, wall, best_lr, fastest, n_grid: int = 3) -> List[str]:
    out = []
    names = list(main)

    def rank(key):
        return sorted(names, key=lambda n: stats[n][key][0])

    by_val, by_train = rank("final_val_loss"), rank("final_train_loss")
    bv, bt = by_val[0], by_train[0]
    out.append(f"- Best final **validation** loss: {LABELS[bv]} ({fmt(*stats[bv]['final_val_loss'])}); "
               f"ranking by final val: " + " < ".join(LABELS[n] for n in by_val) + ".")
    out.append(f"- Best final **training** loss: {LABELS[bt]} ({fmt(*stats[bt]['final_train_loss'])}); "
               f"ranking by final train: " + " < ".join(LABELS[n] for n in by_train) + ".")
    if bv != bt:
        out.append("- The two rankings disagree at the top: train loss alone would pick another optimizer than "
                   "validation loss does (see the design note on the paper's Shakespeare figure).")
    for n in ("mada", "hyperadam"):
        if n in stats and "adamw" in stats:
            for split in ("val", "train"):
                m, s = stats[n][f"final_{split}_loss"]
                ma, sa = stats["adamw"][f"final_{split}_loss"]
                d = m - ma
                tol = max(s, sa)
                if not (math.isfinite(m) and math.isfinite(ma)):
                    verdict = "cannot be compared (a diverged run)"
                elif abs(d) <= tol:
                    verdict = f"ties with AdamW (difference {d:+.4f}, within one std {tol:.4f})"
                elif d < 0:
                    verdict = f"beats AdamW by {-d:.4f} (more than one std, {tol:.4f})"
                else:
                    verdict = f"is worse than AdamW by {d:.4f} (more than one std, {tol:.4f})"
                out.append(f"- {LABELS[n]} vs AdamW, final {split} loss at equal steps: {verdict}.")
    if "mada" in stats and "adamw" in stats:
        r = stats["mada"]["ms_per_step"][0] / stats["adamw"]["ms_per_step"][0]
        out.append(f"- MADA costs {r:.1f}x AdamW's time per step here; at equal wall-clock "
                   f"(budget = {LABELS[fastest]}'s total) MADA's val loss is {fmt(*wall['mada'][1])} vs AdamW's "
                   f"{fmt(*wall['adamw'][1])}.")
    by_wall = sorted(names, key=lambda n: wall[n][1][0])
    out.append(f"- Best val loss at equal wall-clock: {LABELS[by_wall[0]]} ({fmt(*wall[by_wall[0]][1])}).")
    still = [LABELS[n] for n in names if all(r["best_val_loss"] is not None and r["final_val_loss"] is not None
                                              and r["best_val_loss"] >= r["final_val_loss"] - 1e-12 for r in main[n])]
    if len(still) == len(names):
        out.append("- Every run's best val loss is its final one: val loss was still falling at the end, so no "
                   "optimizer overfits at this length and best = final in the table.")
    elif still:
        out.append("- Val loss still falling at the end (best = final) for every seed of: " + ", ".join(still) + ".")
    gaps = {n: stats[n]["final_val_loss"][0] - stats[n]["final_train_loss"][0] for n in names}
    g = max(gaps, key=gaps.get)
    out.append(f"- Generalization gap (final val - final train): from {min(gaps.values()):+.4f} to "
               f"{max(gaps.values()):+.4f} ({LABELS[g]} largest).")
    out.append(f"- One small model, one corpus, a short budget and a {n_grid}-point lr grid: these are indications for this "
               "setting, not general rankings. Differences within one standard deviation over seeds are ties.")
    out.append("")
    return out


def parse_command_line(cls, argv: Optional[Sequence[str]] = None) -> Tuple[Any, List[str]]:
    """The start of a suite's ``main`` (this one, ``experiments.poor_init``): timestamped logging to
    stderr, then ``(cls parsed from argv, argv as a list)`` (default ``sys.argv[1:]``; the report
    shows the command). A bad option exits with status 2 before anything runs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    with exit_on_config_error():
        return parse_config(cls, argv), argv


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    cfg, argv = parse_command_line(CompareConfig, argv)
    return run_suite(cfg, argv=argv)


if __name__ == "__main__":
    main()
