"""Learning-rate sweep of the demo's two optimizers; writes ``docs/demo_lr_sweep.md``.

    .venv/bin/python -m experiments.sweep_lr                 # the sweep recorded in the docs
    .venv/bin/python -m experiments.sweep_lr --help

Each learning rate is one run of ``experiments.train.run`` with the demo's configuration
(``experiments.demo.train_config``: same model, iterations, batch size, schedule, clipping and
weight decay), for torch's AdamW and for MADA over the same grid. The best learning rate of each
optimizer is the one with the lowest *final val* loss. The sweep uses its own seed (default 0),
not the demo's (1337), so the demo's numbers are a fresh draw at the chosen learning rate rather
than the best of several draws; the fixed eval batches are the same.

The output file is generated: the command, commit, seed, configuration, per-run table and the
chosen learning rates (also as one machine-readable HTML comment, ``<!-- best_lr: {...} -->``,
which ``tests/test_train.py`` compares with the constants in ``experiments.demo``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from experiments.config import ConfigError, TrainConfig, config_from_dict, parse_and_run
from experiments.data import load_shakespeare
from experiments.demo import DemoConfig, train_config
from experiments.train import git_commit, package_versions, run as train_run

__all__ = ["SweepConfig", "run", "render", "read_best_lr", "main"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DOC = REPO_ROOT / "docs" / "demo_lr_sweep.md"
GRID = "5e-4,1e-3,2e-3,4e-3,8e-3,1.6e-2,3.2e-2"   # factors of 2; the same grid for both optimizers
_BEST_RE = re.compile(r"<!-- best_lr: (\{.*?\}) -->")


@dataclass
class SweepConfig:
    adamw_lrs: str = field(default=GRID, metadata={"help": "comma-separated AdamW lrs"})
    mada_lrs: str = field(default=GRID, metadata={"help": "comma-separated MADA lrs"})
    seed: int = field(default=0, metadata={"help": "seed of every sweep run (the demo uses 1337)"})
    max_iters: Optional[int] = field(default=None, metadata={"help": "iterations per run (None: the demo's)"})
    threads: int = field(default=0, metadata={"help": "torch threads per run (0: torch's default); results "
                                                     "differ from another thread count by float rounding only"})
    model: str = field(default="demo", metadata={"help": "GPT config (the demo's; tests use tiny)"})
    out: str = field(default=str(DEFAULT_DOC), metadata={"help": "the markdown file to write"})
    runs_dir: str = field(default="runs/lr_sweep", metadata={"help": "logs and checkpoints of the runs"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars on stderr"})
    reuse: bool = field(default=True, metadata={"help": "reuse a finished run of runs_dir whose config is identical"})


def _lrs(text: str, key: str) -> List[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{key}={text!r}: expected comma-separated numbers") from None
    if not values or any(not v > 0 for v in values):
        raise ConfigError(f"--{key}={text!r}: expected at least one learning rate, all > 0")
    return values


def _finished(cfg) -> Optional[Dict[str, Any]]:
    """The summary of a finished run in ``cfg.out_dir`` with exactly this config (progress aside), else None."""
    path = Path(cfg.out_dir) / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    try:   # a field added to TrainConfig since that run counts at its default value
        saved = config_from_dict(TrainConfig, {**summary.get("config", {}), "progress": cfg.progress})
    except ConfigError:
        return None
    same = saved == cfg
    if not same:
        return None
    return summary if summary.get("iters_done") == cfg.max_iters or summary.get("diverged") else None


def _run_commit(log_path: str) -> Dict[str, Any]:
    """The ``git`` entry of a run's manifest (a reused run may predate the current commit)."""
    with open(log_path, encoding="utf-8") as f:
        return json.loads(f.readline()).get("git", {})


def run(s: SweepConfig) -> Dict[str, Any]:
    demo = DemoConfig(seed=s.seed, progress=s.progress, out_dir=s.runs_dir, model=s.model,
                      **({} if s.max_iters is None else {"max_iters": s.max_iters}))
    grids = {"adamw": _lrs(s.adamw_lrs, "adamw_lrs"), "mada": _lrs(s.mada_lrs, "mada_lrs")}
    corpus = load_shakespeare()
    results: Dict[str, List[Dict[str, Any]]] = {}
    for optimizer, lrs in grids.items():
        results[optimizer] = []
        for lr in lrs:
            cfg = train_config(demo, optimizer, lr, checkpoint=False, threads=s.threads)
            cfg = dataclasses.replace(cfg, out_dir=str(Path(s.runs_dir) / f"{optimizer}_lr{lr:g}"))
            summary = _finished(cfg) if s.reuse else None
            if summary is None:
                summary = train_run(cfg, corpus=corpus)
            else:
                log.info("reusing %s (same config)", cfg.out_dir)
            results[optimizer].append({**{k: summary[k] for k in (
                "lr", "final_train_loss", "final_val_loss", "best_train_loss", "best_val_loss", "best_val_iter",
                "diverged", "wall_s", "ms_per_step", "coefficients")}, "git": _run_commit(summary["log"])})
    best = {}
    for optimizer, rows in results.items():
        scored = [r for r in rows if r["final_val_loss"] is not None and not r["diverged"]]
        best[optimizer] = min(scored, key=lambda r: r["final_val_loss"])["lr"] if scored else None
    base = train_config(demo, "adamw", 1.0)   # the shared settings; lr, optimizer and out_dir are dropped
    shared = {k: v for k, v in dataclasses.asdict(base).items() if k not in ("optimizer", "lr", "out_dir", "progress")}
    return {"sweep": dataclasses.asdict(s), "train_config": shared, "results": results, "best_lr": best,
            "git": git_commit(), "versions": package_versions(),
            "torch_num_threads": s.threads or torch.get_num_threads(),
            "total_wall_s": sum(r["wall_s"] for rows in results.values() for r in rows)}


def render(report: Dict[str, Any], command: str) -> str:
    s, cfg = report["sweep"], report["train_config"]
    def describe(git):
        return f"{git.get('commit')}{' (+ uncommitted changes)' if git.get('dirty') else ''}"

    runs_by_commit: Dict[str, List[str]] = {}
    for optimizer, rows in report["results"].items():
        for r in rows:
            runs_by_commit.setdefault(describe(r.get("git", {})), []).append(f"{optimizer} {r['lr']:g}")
    if len(runs_by_commit) == 1:
        commit = f"`{next(iter(runs_by_commit))}`"
    else:   # the runs were made (and reused) across commits: say which run used which
        commit = "; ".join(f"`{c}` ({', '.join(names)})" for c, names in runs_by_commit.items())
    lines = [
        "# Learning-rate sweep for `make demo`",
        "",
        "<!-- Generated by experiments/sweep_lr.py; do not edit by hand: rerun it. -->",
        f"<!-- best_lr: {json.dumps(report['best_lr'], sort_keys=True)} -->",
        "",
        "The demo (`python -m experiments.demo`) trains the same small GPT with `torch.optim.AdamW` and with",
        "`hypergrad.MADA`. Each optimizer runs at the learning rate below with the lowest **final validation**",
        "loss, swept over the same grid with the demo's configuration but another seed than the demo's",
        f"(sweep seed {s['seed']}, demo seed {DemoConfig.seed}); the eval batches are the same.",
        "",
        f"- command: `{command}`",
        f"- commit of each run: {commit}",
        f"- torch {report['versions'].get('torch')}, python {report['versions'].get('python')}, "
        f"torch threads {report['torch_num_threads']}; {report['total_wall_s'] / 60:.0f} min of runs in all",
        "- configuration (every run; `lr` and `optimizer` vary): "
        + ", ".join(f"{k}={v}" for k, v in cfg.items()),
        f"- losses are cross-entropy in nats per character on the fixed eval batches ({cfg['eval_iters']} x "
        f"{cfg['eval_batch_size']} sequences per split);",
        f"  MADA's learned coefficients start at beta1 {cfg['beta1']}, beta2 {cfg['beta2']} and the paper's "
        "(beta3, c, rho, gamma) = (0, 1, 0.6, 1),",
        f"  hyper-learning rate {cfg['hyper_lr']} (a hyper-level Adam).",
        "",
        "| optimizer | lr | final train | final val | best train | best val (iter) | ms/step | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def f(x):
        return "n/a" if x is None else f"{x:.4f}"

    for optimizer, rows in report["results"].items():
        for r in rows:
            note = "**best**" if r["lr"] == report["best_lr"][optimizer] else ("diverged" if r["diverged"] else "")
            if optimizer == "mada" and r["coefficients"]:
                c = r["coefficients"]
                note += (" " if note else "") + "final " + ", ".join(
                    f"{k} {c[k]:.4f}" for k in ("beta1", "beta2", "beta3", "c", "rho", "gamma") if k in c)
            lines.append(f"| {optimizer} | {r['lr']:g} | {f(r['final_train_loss'])} | {f(r['final_val_loss'])} | "
                         f"{f(r['best_train_loss'])} | {f(r['best_val_loss'])} ({r['best_val_iter']}) | "
                         f"{r['ms_per_step']:.0f} | {note} |")
    lines += ["", "Best learning rate by final validation loss: "
              + ", ".join(f"{k} **{v:g}**" if v is not None else f"{k}: none (all diverged)"
                          for k, v in report["best_lr"].items()) + ".",
              "", "ms/step depends on what else the machine was running; compare timings within one run only.", ""]
    return "\n".join(lines)


def read_best_lr(path=DEFAULT_DOC) -> Dict[str, float]:
    """The ``best_lr`` comment of a sweep document."""
    m = _BEST_RE.search(Path(path).read_text(encoding="utf-8"))
    if not m:
        raise ValueError(f"{path}: no '<!-- best_lr: {{...}} -->' line")
    return json.loads(m.group(1))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = list(sys.argv[1:] if argv is None else argv)
    s, report = parse_and_run(SweepConfig, run, args)
    command = " ".join([".venv/bin/python -m experiments.sweep_lr", *args])
    out = Path(s.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report, command), encoding="utf-8")
    (Path(s.runs_dir) / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    print(out.read_text())
    return report


if __name__ == "__main__":
    main()
