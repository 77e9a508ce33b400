"""Benchmark the optimizer step alone: every rule of ``optimizers.RULES`` and fixed-coefficient MADA
against ``torch.optim.AdamW`` (fused and foreach), on the same model, in one process.

    .venv/bin/python -m experiments.bench_step                       # ~10.7M-param char GPT
    .venv/bin/python -m experiments.bench_step --model mlp10m --only adam,mada --steps 30

What is measured: the wall time of ``optimizer.step()`` only. Every parameter's ``.grad`` is set
once to fixed random values (seeded, N(0, 1e-2)) and never changes, so forward/backward cost and
data play no part. All candidates share the model's parameters (each keeps its own state), which
keeps memory at one model plus the optimizer states.

How: candidates are stepped round-robin, one step each per round, so a slow drift of the machine
(thermal, other processes, frequency) hits all of them alike. The first ``--warmup`` rounds
allocate state and warm caches and are not timed; then ``--steps`` rounds are timed and the
median is reported. Python's garbage collector stays on, as in training: turning it off lets
tensors held in reference cycles pile up until memory runs out (at the time of writing
``Family.update`` leaves one such cycle per step, holding all its temporaries). Threads: torch's
default (``torch.get_num_threads()``; set ``OMP_NUM_THREADS`` to change it). Minor page faults
per step are recorded too: on glibc every temporary above 32 MB is a fresh ``mmap``, so a step
that allocates full-size temporaries pays page faults that a fused kernel never does. The load
averages before/after and the peak RSS go into the report: on a shared machine other processes
slow every OpenMP region (absolute numbers suffer most; interleaving protects the ratios).

Extending: a candidate is a name and a factory ``params -> object with .step()`` (``params`` is the
param-group list of ``experiments.model.param_groups``). Register more with ``register(name,
factory)`` or by adding to ``CANDIDATES`` before calling ``main``; ``--only`` picks a subset (the
two torch baselines always run, since every ratio is relative to them).

Output: a markdown table on stdout and a JSON file (``--out``, default ``runs/bench_step.json``)::

    {"machine": {...}, "torch": "2.13.0+cpu", "git_commit": "...", "config": {...},
     "results": {name: {"median_ms", "ratio_to_fused", "ratio_to_foreach", "min_ms", "p25_ms", "p75_ms",
                        "n", "minor_faults_per_step"}}}
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import hypergrad
import optimizers
from experiments.model import CONFIGS, GPTConfig, build_model, count_parameters, param_groups

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "runs" / "bench_step.json"
MODEL_CHOICES = ("gpt10m", "mlp10m", "demo", "tiny")

LR = 1e-3
WEIGHT_DECAY = 0.1
FUSED, FOREACH = "torch_adamw_fused", "torch_adamw_foreach"
BASELINES = (FUSED, FOREACH)

Factory = Callable[[List[dict]], object]

# name -> factory(param_groups) -> optimizer. Insertion order is the table's order.
CANDIDATES: Dict[str, Factory] = {}


def register(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Add a candidate ``factory(param_groups) -> object with .step()`` under ``name``."""
    if name in CANDIDATES and not replace:
        raise ValueError(f"candidate {name!r} is already registered")
    CANDIDATES[name] = factory


register(FUSED, lambda params: torch.optim.AdamW(params, lr=LR, fused=True))
register(FOREACH, lambda params: torch.optim.AdamW(params, lr=LR, foreach=True))

# The vertex rules, each as a RuleOptimizer with its own default coefficients (only the keyword
# arguments below differ from the defaults). Weight decay comes from the param groups, in each
# rule's own convention (L2 for sgd/adam/amsgrad/nadam, proximal for adan_original, decoupled else).
RULE_KWARGS: Dict[str, dict] = {
    "sgd": {"momentum": 0.9},
    "adam": {},
    "adamw": {},
    "amsgrad": {},
    "avgrad": {},
    "yogi": {},
    "adan": {},
    "adan_original": {},
    "lion": {},
    "nadam": {},
}
# Rules of optimizers.RULES deliberately not benchmarked as vertices (with the reason).
SKIPPED_RULES = {"sgd_nesterov": "same buffers as sgd plus one add", "mada": "benchmarked as 'mada' below"}


def _rule_factory(name: str, kwargs: dict) -> Factory:
    return lambda params: optimizers.RuleOptimizer(params, optimizers.get_rule(name), lr=LR, **kwargs)


for _name, _kwargs in RULE_KWARGS.items():
    register(_name, _rule_factory(_name, _kwargs))
register("mada", lambda params: optimizers.RuleOptimizer(params, optimizers.mada(), lr=LR))


def _fused_factory(name: str, kwargs: dict) -> Factory:
    return lambda params: optimizers.RuleOptimizer(params, optimizers.get_rule(name), lr=LR, fused=True, **kwargs)


# The same rules through the fused path (one compiled in-place kernel per tensor; compiles during
# warm-up). NAdam's scalar buffer keeps it on the flat path.
for _name, _kwargs in {**RULE_KWARGS, "mada": {}}.items():
    if optimizers.supports_fused(optimizers.get_rule(_name)):
        register(f"{_name}_fused", _fused_factory(_name, _kwargs))

# Hyper-learning MADA (all six coefficients, Adam hyper-optimizer) and a depth-2 tower
# (Adam's learning rate learned by SGD), on the functional (torch.func.vjp) backend.
register("mada_hyper", lambda params: hypergrad.MADA(params, lr=LR))
register("mada_tower2", lambda params: hypergrad.MADA(
    params, lr=LR, tower=[hypergrad.Level("adam", lr=1e-3, learn=["lr"]), hypergrad.Level("sgd", lr=1e-5)]))
# The same two on the fused path (compiled per-tensor vjp + in-place double-buffered update).
register("mada_hyper_fused", lambda params: hypergrad.MADA(params, lr=LR, fused=True))
register("mada_tower2_fused", lambda params: hypergrad.MADA(
    params, lr=LR, fused=True,
    tower=[hypergrad.Level("adam", lr=1e-3, learn=["lr"]), hypergrad.Level("sgd", lr=1e-5)]))


def _check_rules_covered() -> None:
    missing = set(optimizers.RULES) - set(RULE_KWARGS) - set(SKIPPED_RULES)
    if missing:
        log.warning("rules in optimizers.RULES not benchmarked: %s (add them to RULE_KWARGS)", sorted(missing))


# ------------------------------------------------------------------------------------------ setup
def make_model(name: str, vocab_size: int = 84) -> torch.nn.Module:
    """The benchmark model. GPTs use the Shakespeare vocabulary size (84) without loading the data."""
    key = {"gpt10m": "bench10m"}.get(name, name)
    if key not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; allowed: {MODEL_CHOICES}")
    if isinstance(CONFIGS[key], GPTConfig):
        return build_model(key, vocab_size=vocab_size)
    return build_model(key)


def set_fixed_grads(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter a fixed N(0, 1e-2) gradient (1e-2 keeps squares far from denormals)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-2).to(p.device)


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }
    try:  # the CPU model name, where Linux tells it
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> Optional[str]:
    """HEAD's commit, with ``-dirty`` when the working tree has changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------ timing
def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def time_steps(optims: Dict[str, object], steps: int, warmup: int, progress: bool = True,
               faults: Optional[Dict[str, List[int]]] = None) -> Dict[str, List[float]]:
    """Round-robin: each round steps every optimizer once. Returns the timed steps in ms per name.

    ``faults``, if given, receives each timed step's count of minor page faults per name: a step that
    allocates fresh large temporaries pays for them in page faults (kernel time), which fused
    kernels never do.
    """
    times: Dict[str, List[float]] = {name: [] for name in optims}
    rounds = range(warmup + steps)
    if progress:
        from tqdm import tqdm
        rounds = tqdm(rounds, desc="bench rounds", file=sys.stderr, leave=False)
    for r in rounds:
        if r == warmup:
            gc.collect()
        for name, opt in optims.items():
            f0 = _minor_faults()
            t0 = time.perf_counter_ns()
            opt.step()
            elapsed = time.perf_counter_ns() - t0
            if r >= warmup:
                times[name].append(elapsed / 1e6)
                if faults is not None:
                    faults.setdefault(name, []).append(_minor_faults() - f0)
    return times


def summarise(times: Dict[str, List[float]], faults: Optional[Dict[str, List[int]]] = None) -> Dict[str, dict]:
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    results = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        results[name] = {
            "median_ms": medians[name],
            "ratio_to_fused": medians[name] / medians[FUSED],
            "ratio_to_foreach": medians[name] / medians[FOREACH],
            "min_ms": min(ts),
            "p25_ms": q[0],
            "p75_ms": q[2],
            "n": len(ts),
        }
        if faults and name in faults:
            results[name]["minor_faults_per_step"] = statistics.median(faults[name])
    return results


def markdown_table(results: Dict[str, dict]) -> str:
    # min ms: the least-disturbed step, a hint of the cost on an idle machine (the median is the number)
    lines = ["| optimizer | median ms | x fused AdamW | x foreach AdamW | min ms |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median_ms']:.2f} | {r['ratio_to_fused']:.2f} | {r['ratio_to_foreach']:.2f} "
                     f"| {r['min_ms']:.2f} |")
    return "\n".join(lines)


def run(model_name: str = "gpt10m", steps: int = 20, warmup: int = 2, only: Optional[Sequence[str]] = None,
        seed: int = 0, progress: bool = True) -> dict:
    """Benchmark and return the report dict (see the module docstring)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps}, {warmup}")
    _check_rules_covered()
    names = list(CANDIDATES)
    if only:
        unknown = [n for n in only if n not in CANDIDATES]
        if unknown:
            raise ValueError(f"unknown candidate(s) {unknown}; allowed: {list(CANDIDATES)}")
        names = [n for n in CANDIDATES if n in BASELINES or n in set(only)]
    torch.manual_seed(seed)
    model = make_model(model_name)
    set_fixed_grads(model, seed)
    optims = {}
    for name in names:
        # a fresh group list per optimizer: torch.optim.Optimizer stores (and mutates) the dicts
        optims[name] = CANDIDATES[name](param_groups(model, WEIGHT_DECAY))
    log.info("benchmarking %d candidates on %s (%d parameters), %d warm-up + %d timed rounds",
             len(optims), model_name, count_parameters(model), warmup, steps)
    load_before = _loadavg()
    faults: Dict[str, List[int]] = {}
    times = time_steps(optims, steps, warmup, progress=progress, faults=faults)
    machine = machine_info()
    # Other processes on the machine inflate every number (OpenMP threads wait on each other);
    # the load averages let a reader judge a run. Interleaving keeps the *ratios* comparable.
    machine["loadavg_before"], machine["loadavg_after"] = load_before, _loadavg()
    if resource is not None:  # ru_maxrss is in KiB on Linux
        machine["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "machine": machine,
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "config": {
            "model": model_name,
            "n_params": count_parameters(model),
            "param_tensors": sum(1 for _ in model.parameters()),
            "dtype": str(next(model.parameters()).dtype),
            "steps": steps,
            "warmup": warmup,
            "seed": seed,
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "weight_decay_on": "dim >= 2 (experiments.model.param_groups)",
            "grad": "fixed N(0, 1e-2), set once",
            "order": "round-robin, one step per candidate per round",
            "threads": torch.get_num_threads(),
        },
        "results": summarise(times, faults),
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODEL_CHOICES, default="gpt10m")
    p.add_argument("--steps", type=int, default=20, help="timed rounds (median over these); default 20")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first; default 2")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated candidates (the torch AdamW baselines always run): "
                        + ",".join(CANDIDATES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report path; default {DEFAULT_OUT}")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    report = run(args.model, steps=args.steps, warmup=args.warmup, only=args.only, seed=args.seed,
                 progress=not args.no_progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    cfg = report["config"]
    print(f"Optimizer step only: {cfg['model']} ({cfg['n_params'] / 1e6:.2f}M params), torch {report['torch']}, "
          f"{cfg['threads']} threads, median of {cfg['steps']} interleaved steps\n")
    print(markdown_table(report["results"]))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
