"""Train the char-level GPT on offline Shakespeare with any optimizer of the project.

    .venv/bin/python -m experiments.train --optimizer=mada --max_iters=500 --out_dir=runs/mada
    .venv/bin/python -m experiments.train --help            # every option, its type and default

One run, read top to bottom: build the corpus (``experiments.data``) and a GPT
(``experiments.model``), an optimizer, a cosine learning-rate schedule with linear warm-up; then
``max_iters`` steps of (``grad_accum`` micro-batches -> gradient clipping -> ``optimizer.step()``),
with train and val loss measured every ``eval_interval`` iterations on fixed eval batches.

Optimizers (``--optimizer``):

===============  ===========================================================================
adamw            ``torch.optim.AdamW`` itself: the baseline (never one of our rules, never a
                 "frozen MADA")
mada             ``hypergrad.MADA``: learns (beta1, beta2, beta3, c, rho, gamma) by one-step
                 hyper-gradient descent, hyper-level ``Level("adam", lr=hyper_lr)``
hyperadam        ``hypergrad.HyperAdam``: MADA at the Adam vertex learning beta1, beta2 only
<rule>           any other name of ``optimizers.RULES`` (``lion``, ``yogi``...), run with fixed
                 coefficients by ``optimizers.build_optimizer``
rule:<rule>      the same for any rule, including ``rule:adamw`` and ``rule:mada`` (our
                 AdamW rule, MADA with fixed default coefficients)
===============  ===========================================================================

``--beta1/--beta2`` (default 0.9, 0.99, nanoGPT's shakespeare-char values) go to adamw, hyperadam,
mada (as initial values) and the rules that follow Adam's beta convention (``ADAM_CONVENTION``);
Lion, the original Adan and SGD keep their own defaults. ``--coefs=name=value,...`` sets any other
coefficient (MADA's initial ``rho``, Lion's betas...).

Weight decay applies to matrices only (``experiments.model.param_groups``). With gradient clipping,
the hyper-optimizers see the clipped gradient, both for the model update and as the cotangent of
the hypergradient (the gradient the optimizer actually used).

Outputs under ``out_dir``:

* ``log.jsonl``: a first ``manifest`` line (git commit, config, package versions, seed, data and
  model sizes), then ``iter`` lines every ``log_interval`` iterations (minibatch loss, lr,
  gradient norm before clipping, learned coefficients and their hypergradients for hyper
  optimizers) and ``eval`` lines (train and val loss on the fixed eval batches);
* ``ckpt.pt``: model and optimizer ``state_dict`` (for a HyperOptimizer this includes the
  coefficients and the whole tower's state), scheduler state, config, iteration, eval history,
  RNG states and the learned coefficients as floats, written by ``hypergrad.checkpoint.save``:
  plain containers of tensors under ``{"format", "sha256", "payload"}``, so
  ``torch.load(path, weights_only=True)`` reads it; atomic (temporary file, then ``os.replace``)
  and digest-checked by ``load_checkpoint``. ``--resume=true`` continues a run from it exactly;
* ``summary.json``: what ``run`` returns.

``run(config) -> summary`` is the library entry point (the demo and the comparison suites call
it); ``main`` parses ``--key=value`` arguments (``experiments.config``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import hypergrad
import optimizers
from experiments.config import (ConfigError, TrainConfig, config_from_dict, optimizer_names, parse_and_run,
                                parse_coefs)
from experiments.data import TRAIN_FRACTION, CharCorpus, load_shakespeare
from experiments.model import CONFIGS, GPT, GPTConfig, count_parameters, param_groups

__all__ = ["run", "main", "make_optimizer", "lr_lambda", "evaluate", "fixed_batches", "load_checkpoint",
           "manifest", "ADAM_CONVENTION", "optimizer_names"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_NAME, CKPT_NAME, SUMMARY_NAME = "log.jsonl", "ckpt.pt", "summary.json"

# Rules whose beta1/beta2 mean what Adam's do (first/second-moment EMA): --beta1/--beta2 apply.
ADAM_CONVENTION = ("adam", "adamw", "amsgrad", "avgrad", "yogi", "adan", "nadam", "mada")
# Short names of learned coefficients for the progress bar.
_SHORT = {"beta1": "b1", "beta2": "b2", "beta3": "b3", "gamma": "gam"}


# ------------------------------------------------------------------------------------------ pieces
def model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    if cfg.model not in CONFIGS:
        raise ConfigError(f"model={cfg.model!r}: unknown; allowed: {sorted(CONFIGS)}")
    base = CONFIGS[cfg.model]
    if not isinstance(base, GPTConfig):
        raise ConfigError(f"model={cfg.model!r} is not a GPT config")
    fields = dataclasses.asdict(base)
    fields["vocab_size"] = vocab_size
    for name in ("block_size", "n_layer", "n_head", "n_embd", "dropout"):
        if getattr(cfg, name) is not None:
            fields[name] = getattr(cfg, name)
    try:
        return GPTConfig(**fields)
    except ValueError as err:
        raise ConfigError(f"model {cfg.model!r} with overrides: {err}") from None


def make_optimizer(cfg: TrainConfig, groups: List[dict]) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over ``groups`` (see the module docstring)."""
    name = cfg.optimizer
    coefs = parse_coefs(cfg.coefs)
    betas = {"beta1": cfg.beta1, "beta2": cfg.beta2}
    if name == "adamw":
        extra = {k: coefs.pop(k) for k in ("eps",) if k in coefs}
        if coefs:
            raise ConfigError(f"coefs={cfg.coefs!r}: torch.optim.AdamW takes only eps here, not {sorted(coefs)}")
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                 fused=cfg.fused or None, **extra)
    if name in ("mada", "hyperadam"):
        cls = hypergrad.MADA if name == "mada" else hypergrad.HyperAdam
        try:
            return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       tower=hypergrad.Level("adam", lr=cfg.hyper_lr), warmup=cfg.hyper_warmup,
                       hyper_interval=cfg.hyper_interval, clip_hypergrad=cfg.clip_hypergrad, fused=cfg.fused,
                       **{**betas, **coefs})
        except ValueError as err:
            raise ConfigError(f"optimizer={name!r}, coefs={cfg.coefs!r}: {err}") from None
    rule = name[len("rule:"):] if name.startswith("rule:") else name
    if rule not in optimizers.RULES:
        raise ConfigError(f"optimizer={name!r}: unknown; allowed: {', '.join(optimizer_names())}")
    kwargs = {**(betas if rule in ADAM_CONVENTION else {}), **coefs}
    try:
        return optimizers.build_optimizer(rule, groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cfg.fused,
                                          **kwargs)
    except ValueError as err:
        raise ConfigError(f"optimizer={name!r}, coefs={cfg.coefs!r}: {err}") from None


def lr_lambda(cfg: TrainConfig):
    """Multiplier of ``cfg.lr`` at iteration ``it`` (0-based): linear warm-up, cosine to ``min_lr_ratio``.

    Warm-up: ``(it + 1) / (warmup_iters + 1)`` for ``it < warmup_iters`` (never 0, as nanoGPT);
    then ``min + (1 - min) * (1 + cos(pi * progress)) / 2`` over ``[warmup_iters, decay_iters]``;
    ``min_lr_ratio`` after ``decay_iters``.
    """
    warmup, decay, floor = cfg.warmup_iters, cfg.decay_iters, cfg.min_lr_ratio

    def f(it: int) -> float:
        if it < warmup:
            return (it + 1) / (warmup + 1)
        if it >= decay:
            return floor
        progress = (it - warmup) / max(decay - warmup, 1)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def fixed_batches(corpus: CharCorpus, split: str, n: int, batch_size: int, block_size: int,
                  seed: int) -> List[Tuple[Tensor, Tensor]]:
    """``n`` batches drawn once from ``split`` with their own generator: identical across runs."""
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


def _learned(opt: torch.optim.Optimizer) -> Tuple[Dict[str, float], Dict[str, float]]:
    """(coefficients, hypergradients) as floats for a hyper optimizer; ({}, {}) otherwise."""
    if not isinstance(opt, hypergrad.HyperOptimizer):
        return {}, {}
    coefs = {k: float(v) for k, v in opt.coefficients().items()}
    grads = {k: float(v) for k, v in opt.hypergradients().items()}
    return coefs, grads


def _finite(x: Optional[float]) -> Optional[float]:
    """JSON has no NaN/inf: non-finite numbers are logged as null (and the run marked diverged)."""
    return x if x is not None and math.isfinite(x) else None


# ------------------------------------------------------------------------------------------ manifest
def git_commit() -> Dict[str, Any]:
    """``{"commit": HEAD or None, "dirty": bool or None}`` from ``git`` in the repository root.

    Read once per process (the first call) and cached: the code a process runs is the code it
    imported, even if the checkout moves on while a long sweep is running.
    """
    return dict(_git_commit_once())


@functools.lru_cache(maxsize=1)
def _git_commit_once() -> Dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return {"commit": head, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for dist in ("torch", "numpy", "tqdm", "matplotlib", "hypergrad", "shakespeare"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def manifest(cfg: TrainConfig, gpt: GPTConfig, n_params: int, corpus: CharCorpus) -> Dict[str, Any]:
    """What the run depends on; nothing machine-identifying beyond CPU count and thread count."""
    return {
        "type": "manifest",
        "git": git_commit(),
        "config": dataclasses.asdict(cfg),
        "seed": cfg.seed,
        "versions": package_versions(),
        "model": {**dataclasses.asdict(gpt), "n_params": n_params},
        "data": {"texts": len(corpus.files), "train_chars": len(corpus.train), "val_chars": len(corpus.val),
                 "vocab_size": corpus.vocab_size, "train_fraction": TRAIN_FRACTION},
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "argv": list(sys.argv[1:]),
    }


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, **payload) -> None:
    """``hypergrad.checkpoint.save``: atomic (temporary file, fsync, ``os.replace``), with a SHA-256 digest."""
    hypergrad.checkpoint.save(path, payload)


def load_checkpoint(path: os.PathLike) -> Dict[str, Any]:
    """The payload of a checkpoint written by ``run``: read with ``weights_only=True`` and its digest checked
    (``hypergrad.checkpoint.load``; a truncated or modified file is a ``CheckpointError``)."""
    return hypergrad.checkpoint.load(path)


class JsonlLog:
    """JSON lines, flushed after each line (a killed run keeps what it logged)."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        self._f = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        self._f.write(json.dumps(record, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# Fields that may differ between a checkpoint's config and the config that resumes it.
RESUME_MAY_CHANGE = ("resume", "progress", "threads", "checkpoint_interval", "log_interval", "eval_interval")


def _resume_checkpoint(path: Path, cfg: TrainConfig) -> Dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"resume=True but there is no checkpoint {path}")
    ck = load_checkpoint(path)
    saved = config_from_dict(TrainConfig, ck["config"])
    changed = [f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in dataclasses.asdict(cfg)
               if k not in RESUME_MAY_CHANGE and getattr(saved, k) != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"resume: the config differs from the checkpoint's ({'; '.join(changed)}); only "
                          f"{', '.join(RESUME_MAY_CHANGE)} may change")
    log.info("resuming %s from iteration %d", path, ck["iter"])
    return ck


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop the log lines a crashed run wrote after its last checkpoint (atomically)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("iter", -1) <= iteration]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ the run
def run(cfg: TrainConfig, corpus: Optional[CharCorpus] = None) -> Dict[str, Any]:
    """Train one GPT as ``cfg`` says; return (and write to ``out_dir/summary.json``) the summary.

    The summary holds final and best train/val loss (on the fixed eval batches), the iteration of
    the best val loss, wall time of the whole run, training time (forward, backward, clipping and
    step only) and ms per step, the final learned coefficients, and the output paths.
    ``cfg.threads`` applies for the duration of the call only.
    """
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, corpus)
    finally:
        if cfg.threads:
            torch.set_num_threads(previous_threads)


def _run(cfg: TrainConfig, corpus: Optional[CharCorpus]) -> Dict[str, Any]:
    wall_start = time.perf_counter()
    corpus = load_shakespeare() if corpus is None else corpus
    gpt = model_config(cfg, corpus.vocab_size)
    T = gpt.block_size
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Seeding: the model init and dropout use torch's global generator seeded with cfg.seed; the
    # training batches come from their own generator with the same seed, so two optimizers of the
    # same seed see the same initial weights and the same batches. The eval batches depend on
    # eval_seed only: every run of every seed is scored on the same text.
    torch.manual_seed(cfg.seed)
    model = GPT(gpt)
    model.train()
    n_params = count_parameters(model)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    eval_sets = {split: fixed_batches(corpus, split, cfg.eval_iters, cfg.eval_batch_size, T, cfg.eval_seed + i)
                 for i, split in enumerate(("train", "val"))}

    opt = make_optimizer(cfg, param_groups(model, cfg.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    hyper = isinstance(opt, hypergrad.HyperOptimizer)

    ckpt_path = out_dir / CKPT_NAME
    evals: List[Dict[str, Any]] = []
    train_s = 0.0
    start_iter = 0
    if cfg.resume:
        # Everything the next iteration depends on: weights, optimizer (for HyperOptimizer: model
        # state, coefficients and the whole tower), schedule position, both RNGs, and the history.
        ck = _resume_checkpoint(ckpt_path, cfg)
        hypergrad.checkpoint.restore(model, opt, ck)   # checks keys, shapes and optimizer identity first
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"]["torch"])
        data_gen.set_state(ck["rng"]["data"])
        start_iter, evals, train_s = int(ck["iter"]), list(ck["evals"]), float(ck["train_s"])
        _truncate_log(out_dir / LOG_NAME, start_iter)
    jlog = JsonlLog(out_dir / LOG_NAME, append=cfg.resume)
    jlog.write({**manifest(cfg, gpt, n_params, corpus), **({"resumed_from_iter": start_iter} if cfg.resume else {})})
    log.info("%s: %s GPT, %d parameters, %d iters of %d x %d x %d tokens, lr %.2e -> %s",
             cfg.optimizer, cfg.model, n_params, cfg.max_iters, cfg.grad_accum, cfg.batch_size, T, cfg.lr, out_dir)

    diverged = False
    iters_done = start_iter
    last_loss = float("nan")

    def do_eval(iteration: int) -> Dict[str, Any]:
        t0 = time.perf_counter()
        rec = {"type": "eval", "iter": iteration,
               **{f"{s}_loss": _finite(evaluate(model, b)) for s, b in eval_sets.items()},
               "train_s": train_s,
               "elapsed_s": time.perf_counter() - wall_start}
        rec["eval_s"] = time.perf_counter() - t0
        if hyper:
            rec["coefficients"] = _learned(opt)[0]
        evals.append(rec)
        jlog.write(rec)
        return rec

    def checkpoint(iteration: int) -> None:
        if not cfg.checkpoint:
            return
        coefs = _learned(opt)[0]
        save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=opt.state_dict(),
                        scheduler=sched.state_dict(), config=dataclasses.asdict(cfg), iter=iteration,
                        coefficients=coefs, evals=evals, train_s=train_s,
                        rng={"torch": torch.get_rng_state(), "data": data_gen.get_state()})

    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_iters, initial=start_iter, desc=cfg.optimizer, file=sys.stderr,
                   dynamic_ncols=True, leave=True)
    try:
        last_eval = evals[-1] if evals else do_eval(0)
        for it in range(start_iter, cfg.max_iters):
            lr = opt.param_groups[0]["lr"]
            t0 = time.perf_counter()
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                x, y = corpus.get_batch("train", cfg.batch_size, T, data_gen)
                _, loss = model(x, y)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            train_s += time.perf_counter() - t0
            last_loss = loss_sum / cfg.grad_accum
            done = iters_done = it + 1
            if not math.isfinite(last_loss):
                log.warning("%s: non-finite training loss at iter %d; stopping the run", cfg.optimizer, done)
                diverged = True
            if done % cfg.log_interval == 0 or done == cfg.max_iters or diverged:
                coefs, hgrads = _learned(opt)
                rec = {"type": "iter", "iter": done, "loss": _finite(last_loss), "lr": lr,
                       "grad_norm": _finite(grad_norm), "train_s": train_s}
                if hyper:
                    rec["coefficients"] = coefs
                    rec["hypergradients"] = {k: _finite(v) for k, v in hgrads.items()}
                jlog.write(rec)
            if diverged:
                break
            if done % cfg.eval_interval == 0 or done == cfg.max_iters:
                last_eval = do_eval(done)
            if cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0 and done != cfg.max_iters:
                checkpoint(done)
            if bar is not None:
                bar.update(1)
                postfix = f"loss={last_loss:.3f} val={last_eval['val_loss'] or float('nan'):.3f} lr={lr:.1e}"
                if hyper:
                    postfix += " " + " ".join(f"{_SHORT.get(k, k)}={v:.4f}" for k, v in _learned(opt)[0].items())
                bar.set_postfix_str(postfix, refresh=False)
        if diverged and (not evals or evals[-1]["iter"] != iters_done):
            do_eval(iters_done)
        checkpoint(iters_done)
    finally:
        if bar is not None:
            bar.close()
        jlog.close()

    def best(split: str) -> Tuple[Optional[float], Optional[int]]:
        scored = [(e[f"{split}_loss"], e["iter"]) for e in evals if e[f"{split}_loss"] is not None]
        return min(scored) if scored else (None, None)

    (best_train, best_train_iter), (best_val, best_val_iter) = best("train"), best("val")
    wall = time.perf_counter() - wall_start
    summary = {
        "optimizer": cfg.optimizer,
        "optimizer_repr": "torch.optim.AdamW" if isinstance(opt, torch.optim.AdamW) else repr(opt),
        "lr": cfg.lr,
        "seed": cfg.seed,
        "n_params": n_params,
        "iters_done": iters_done,
        "block_size": T,
        "tokens_per_iter": cfg.grad_accum * cfg.batch_size * T,
        "diverged": diverged,
        "initial_train_loss": evals[0]["train_loss"],
        "initial_val_loss": evals[0]["val_loss"],
        "final_train_loss": evals[-1]["train_loss"],
        "final_val_loss": evals[-1]["val_loss"],
        "best_train_loss": best_train,
        "best_train_iter": best_train_iter,
        "best_val_loss": best_val,
        "best_val_iter": best_val_iter,
        "last_minibatch_loss": _finite(last_loss),
        "wall_s": wall,
        "train_s": train_s,
        "eval_s": sum(e["eval_s"] for e in evals),
        "ms_per_step": 1e3 * train_s / max(iters_done, 1),
        "coefficients": _learned(opt)[0],
        "out_dir": str(out_dir),
        "log": str(out_dir / LOG_NAME),
        "checkpoint": str(ckpt_path) if cfg.checkpoint else None,
        "config": dataclasses.asdict(cfg),
    }
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    log.info("%s: final train %.4f val %.4f (best val %.4f at %s), %.1f s, %.1f ms/step", cfg.optimizer,
             summary["final_train_loss"] or float("nan"), summary["final_val_loss"] or float("nan"),
             best_val or float("nan"), best_val_iter, wall, summary["ms_per_step"])
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg, summary = parse_and_run(TrainConfig, run, argv)
    keys = ("final_train_loss", "final_val_loss", "best_train_loss", "best_val_loss", "wall_s", "ms_per_step")
    print(json.dumps({k: summary[k] for k in ("optimizer", "lr", "iters_done", *keys, "coefficients")}, indent=2))
    return summary


if __name__ == "__main__":
    main()
