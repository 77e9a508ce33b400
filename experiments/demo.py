"""Demo: a small char-level GPT on offline Shakespeare, trained with torch's AdamW and with our rules.

    .venv/bin/python -m experiments.demo                 # `make demo`; ~1.5 minutes on 2 idle CPU cores
    .venv/bin/python -m experiments.demo --steps 50 --only torch_adamw,mada

Every run starts from the same initial weights (same seed) and sees the same batches in the same
order; only the optimizer differs. The baseline is ``torch.optim.AdamW`` itself, never one of our
rules at the Adam vertex. Runs:

=============  ==============================================  ==========================
name           optimizer                                       lr, weight decay
=============  ==============================================  ==========================
torch_adamw    torch.optim.AdamW, betas (0.9, 0.99)            lr, wd
adamw          RuleOptimizer(adamw), betas (0.9, 0.99)         lr, wd (should track the
                                                               baseline to float rounding)
adan           RuleOptimizer(adan), betas (0.9, 0.99), b3 0.9  lr, wd
lion           RuleOptimizer(lion), its defaults (0.9, 0.99)   lr/5, wd*5 (Lion paper: lr
                                                               3-10x smaller, as sign
                                                               updates are larger; keep
                                                               lr*wd)
avgrad         RuleOptimizer(avgrad), betas (0.9, 0.99)        lr, wd
yogi           RuleOptimizer(yogi), betas (0.9, 0.99),         lr, wd
               eps 1e-3 (its reference default)
mada           RuleOptimizer(mada()), fixed default            lr, wd
               coefficients (no hyper-learning here)
=============  ==============================================  ==========================

Weight decay applies to matrices only (``experiments.model.param_groups``); constant learning rate
(no warm-up or cosine: a later issue brings the full training job). At the end, train and val loss
are each averaged over the same fixed eval batches for every run. Both are reported: on a small
model the two can rank optimizers differently (design.md section 4).

Writes ``runs/demo.json`` (``--out``) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import optimizers
from experiments.bench_step import git_commit, machine_info
from experiments.data import CharCorpus, load_shakespeare
from experiments.model import CONFIGS, GPT, GPTConfig, count_parameters, param_groups

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "runs" / "demo.json"

BETAS = (0.9, 0.99)   # nanoGPT's shakespeare-char betas (small batches: beta2 0.99 reacts faster)


@dataclass(frozen=True)
class RunSpec:
    """One optimizer of the demo: ``factory(param_groups, lr)`` builds it; lr and wd are scaled from the base."""

    name: str
    factory: Callable[[List[dict], float], torch.optim.Optimizer]
    lr_scale: float = 1.0
    wd_scale: float = 1.0
    note: str = ""


def _rule(name: str, **kwargs) -> Callable[[List[dict], float], torch.optim.Optimizer]:
    return lambda groups, lr: optimizers.RuleOptimizer(groups, optimizers.get_rule(name), lr=lr, **kwargs)


RUNS: Tuple[RunSpec, ...] = (
    RunSpec("torch_adamw", lambda groups, lr: torch.optim.AdamW(groups, lr=lr, betas=BETAS), note="baseline"),
    RunSpec("adamw", _rule("adamw", betas=BETAS)),
    RunSpec("adan", _rule("adan", betas=BETAS)),
    RunSpec("lion", _rule("lion"), lr_scale=0.2, wd_scale=5.0),
    RunSpec("avgrad", _rule("avgrad", betas=BETAS)),
    RunSpec("yogi", _rule("yogi", betas=BETAS)),
    RunSpec("mada", lambda groups, lr: optimizers.RuleOptimizer(groups, optimizers.mada(), lr=lr),
            note="fixed default coefficients"),
)


@dataclass(frozen=True)
class DemoConfig:
    model: str = "demo"          # a GPT name of experiments.model.CONFIGS
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.1
    eval_batches: int = 8        # per split, each of eval_batch_size sequences
    eval_batch_size: int = 32
    seed: int = 1337


# ------------------------------------------------------------------------------------------ pieces
def model_config(cfg: DemoConfig, corpus: CharCorpus) -> GPTConfig:
    base = CONFIGS[cfg.model]
    if not isinstance(base, GPTConfig):
        raise ValueError(f"demo trains a GPT; {cfg.model!r} is not one")
    return GPTConfig(**{**asdict(base), "vocab_size": corpus.vocab_size})


def fixed_batches(corpus: CharCorpus, split: str, n: int, batch_size: int, block_size: int,
                  seed: int) -> List[Tuple[Tensor, Tensor]]:
    """``n`` batches drawn once from ``split`` with their own generator: identical for every run."""
    gen = torch.Generator().manual_seed(seed)
    return [corpus.get_batch(split, batch_size, block_size, gen) for _ in range(n)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[Tuple[Tensor, Tensor]]) -> float:
    """Mean loss over ``batches`` in eval mode (no dropout); restores the previous mode."""
    was_training = model.training
    model.eval()
    total = sum(model(x, y)[1].item() for x, y in batches)
    model.train(was_training)
    return total / len(batches)


def train(spec: RunSpec, gpt_config: GPTConfig, train_batches: Sequence[Tuple[Tensor, Tensor]],
          eval_sets: Dict[str, Sequence[Tuple[Tensor, Tensor]]], lr: float, weight_decay: float, seed: int,
          progress: bool = True) -> dict:
    """Train a fresh GPT (initialised from ``seed``) on ``train_batches`` with ``spec``'s optimizer.

    Returns the run's record: final loss per eval split, per-step training losses, wall time of the
    training loop (evaluation excluded), and ms/step.
    """
    torch.manual_seed(seed)
    model = GPT(gpt_config)
    model.train()
    run_lr, run_wd = lr * spec.lr_scale, weight_decay * spec.wd_scale
    opt = spec.factory(param_groups(model, run_wd), run_lr)
    losses: List[float] = []
    steps = train_batches
    if progress:
        from tqdm import tqdm
        steps = tqdm(train_batches, desc=f"{spec.name:>12}", file=sys.stderr, leave=False)
    start = time.perf_counter()
    for x, y in steps:
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            log.warning("%s: non-finite training loss at step %d; stopping this run", spec.name, len(losses))
            break
    wall = time.perf_counter() - start
    record = {
        "lr": run_lr,
        "weight_decay": run_wd,
        "note": spec.note,
        "optimizer": repr(opt) if not isinstance(opt, torch.optim.AdamW) else "torch.optim.AdamW",
        "steps_done": len(losses),
        "wall_s": wall,
        "ms_per_step": 1e3 * wall / max(len(losses), 1),
        "train_losses": losses,
    }
    for split, batches in eval_sets.items():
        record[f"final_{split}_loss"] = evaluate(model, batches)
    return record


def markdown_table(results: Dict[str, dict]) -> str:
    lines = ["| optimizer | lr | final train loss | final val loss | wall s | ms/step |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['lr']:.1e} | {r['final_train_loss']:.4f} | {r['final_val_loss']:.4f} | "
                     f"{r['wall_s']:.1f} | {r['ms_per_step']:.1f} |")
    return "\n".join(lines)


def run(cfg: DemoConfig = DemoConfig(), only: Optional[Sequence[str]] = None, progress: bool = True) -> dict:
    """All runs of ``RUNS`` (or those named in ``only``) on ``cfg``; returns the report dict."""
    specs = list(RUNS)
    if only:
        unknown = sorted(set(only) - {s.name for s in RUNS})
        if unknown:
            raise ValueError(f"unknown run(s) {unknown}; allowed: {[s.name for s in RUNS]}")
        specs = [s for s in RUNS if s.name in set(only)]
    corpus = load_shakespeare()
    gpt_config = model_config(cfg, corpus)
    T = gpt_config.block_size
    # The same batches for every run: drawn once here, from seeds derived from cfg.seed.
    train_batches = fixed_batches(corpus, "train", cfg.steps, cfg.batch_size, T, cfg.seed)
    eval_sets = {split: fixed_batches(corpus, split, cfg.eval_batches, cfg.eval_batch_size, T, cfg.seed + 1 + i)
                 for i, split in enumerate(("train", "val"))}
    torch.manual_seed(cfg.seed)
    init_model = GPT(gpt_config)
    initial = {f"initial_{split}_loss": evaluate(init_model, b) for split, b in eval_sets.items()}
    log.info("demo: %s GPT, %d parameters, %d steps of batch %d x %d, %d runs",
             cfg.model, count_parameters(init_model), cfg.steps, cfg.batch_size, T, len(specs))
    results = {}
    total_start = time.perf_counter()
    for spec in specs:
        results[spec.name] = train(spec, gpt_config, train_batches, eval_sets, cfg.lr, cfg.weight_decay,
                                   cfg.seed, progress=progress)
        r = results[spec.name]
        log.info("%-12s train %.4f  val %.4f  (%.1f s)", spec.name, r["final_train_loss"], r["final_val_loss"],
                 r["wall_s"])
    return {
        "machine": machine_info(),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "config": {**asdict(cfg), "gpt": asdict(gpt_config), "n_params": count_parameters(init_model),
                   "betas": BETAS, "weight_decay_on": "dim >= 2", "schedule": "constant lr",
                   "corpus": {"train_chars": len(corpus.train), "val_chars": len(corpus.val),
                              "vocab_size": corpus.vocab_size, "texts": len(corpus.files)}},
        **initial,
        "total_wall_s": time.perf_counter() - total_start,
        "results": results,
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    d = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="base learning rate (Lion uses lr/5)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model", default=d.model, help="a GPT config of experiments.model.CONFIGS")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated run names: " + ",".join(s.name for s in RUNS))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = DemoConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     weight_decay=args.weight_decay, seed=args.seed)
    report = run(cfg, only=args.only, progress=not args.no_progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    c = report["config"]
    print(f"Char-level Shakespeare, {c['model']} GPT ({c['n_params'] / 1e6:.2f}M params), {c['steps']} steps of "
          f"batch {c['batch_size']} x {c['gpt']['block_size']}, same init and batches for every optimizer. "
          f"Initial loss: train {report['initial_train_loss']:.4f}, val {report['initial_val_loss']:.4f}.\n")
    print(markdown_table(report["results"]))
    if "torch_adamw" in report["results"] and "adamw" in report["results"]:
        a, b = report["results"]["torch_adamw"], report["results"]["adamw"]
        print(f"\nours adamw vs torch AdamW: |delta train loss| = "
              f"{abs(a['final_train_loss'] - b['final_train_loss']):.2e}")
    print(f"\ntotal {report['total_wall_s']:.0f} s; wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
