"""Benchmark the optimizer step alone: every rule of ``optimizers.RULES`` and fixed-coefficient MADA
against ``torch.optim.AdamW`` (fused and foreach), on the same model, in one process.

    .venv/bin/python -m experiments.bench_step                       # ~10.7M-param char GPT
    .venv/bin/python -m experiments.bench_step --model mlp10m --only adam,mada --steps 30
    .venv/bin/python -m experiments.bench_step --all --out runs/bench_step.json --doc docs/performance.md

What is measured: the wall time of ``optimizer.step()`` only. Every parameter's ``.grad`` alternates,
round by round, between two fixed sets of random values (seeded, N(0, 1e-2); ``GradientSets``), so
forward/backward cost and data play no part. All candidates share the model's parameters (each keeps its own state), which
keeps memory at one model plus the optimizer states.

How: candidates are stepped round-robin, one step each per round in an order shuffled every round
(``round_order``), so a slow drift of the machine (thermal, other processes, frequency) hits all of
them alike, and none mostly runs after the same neighbour. The eager candidates (the functional
path, 10-200x slower) are timed in a group of their own, with ``--slow-steps`` rounds and both
baselines again (``step_table``), as in ``--all``: interleaved with the fused ones, their full-size
temporaries (fresh ``mmap``s: a whole default run spent 204 s in the kernel against 123 s in user
code, before the eager updates ran in chunks) disturbed the fused steps that followed them, and the
run took 3.2 minutes instead of 1.1. The first ``--warmup`` rounds
allocate state and warm caches and are not timed; then ``--steps`` rounds are timed and the
median is reported. Python's garbage collector stays on, as in training: turning it off lets
tensors held in reference cycles pile up until memory runs out (at the time of writing
``Family.update`` leaves one such cycle per step, holding all its temporaries). Threads: torch's
default (``torch.get_num_threads()``) unless ``--threads`` says otherwise. On a loaded machine
(load average above the core count) ``--threads 1`` gives far steadier numbers: an OpenMP
region with 2 threads waits for both, and a descheduled thread stalls every small kernel.
Minor page faults per step are recorded too: on glibc every temporary above 32 MB is a fresh
``mmap``, so a step that allocates full-size temporaries pays page faults that a fused kernel never
does. The load averages before/after and the peak RSS go into the report: on a shared machine
other processes slow every OpenMP region (absolute numbers suffer most; interleaving protects the
ratios). ``--device cuda`` runs the same on a GPU (default: cuda if available, else cpu); the
timers then synchronize the device before every reading.

Compiled kernels: the fused candidates compile during warm-up (never timed). Candidates built on
the same rule share their compiled kernels (``_share_kernels``: the private per-optimizer kernel
caches are pointed at one per-process cache), so a rule compiles once per process however many
models and sizes it is benchmarked on.

Extending: a candidate is a name and a factory ``params -> object with .step()`` (``params`` is the
param-group list of ``experiments.model.param_groups``). Register more with ``register(name,
factory)`` or by adding to ``CANDIDATES`` before calling ``main``; ``--only`` picks a subset (the
two torch baselines always run, since every ratio is relative to them).

Output: a markdown table on stdout and a JSON file (``--out``, default ``runs/bench_step.json``)::

    {"machine": {...}, "torch": "2.13.0+cpu", "git_commit": "...", "config": {...},
     "results": {name: {"median_ms", "ratio_to_fused", "ratio_to_foreach", "min_ms", "p25_ms", "p75_ms",
                        "n", "minor_faults_per_step"}}}

``--all`` (issue #5) instead runs every measurement of the performance report and writes one JSON
report (``"kind": "all"``) and, with ``--doc``, the markdown page generated from it
(``docs/performance.md``): (a) the step table on the ~10M GPT and the ~10M MLP, (b) optimizer buffers
per candidate, counted from the code and measured, and the peak memory above the model, (c) the
bytes each step must move per parameter and the ratio to fused AdamW that this floor implies, (d) the
whole train step (forward, backward, step) on the demo GPT and on nanoGPT's Shakespeare config,
(e) step time against parameter count (MLPs of 1M to 50M parameters), (f) the cost of each
extra level of a hyper-optimizer tower, (g) the two compiled kernels of the hyper-learning step
timed alone against their bandwidth floors (``kernel_table``) and (h) the step of hyper-learning
every k steps (``hyper_interval``), averaged over its cycle (``interval_table``). See ``run_all`` for the knobs and
``write_doc`` for the page.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import json
import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import hypergrad
import optimizers
from optimizers.compiled import TensorKernel
from optimizers.prefetch import PREFETCH_BYTES
from optimizers.functional import displacement, flat_buffer
from experiments.model import CONFIGS, GPTConfig, build_model, count_parameters, param_groups

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "runs" / "bench_step.json"
MODEL_CHOICES = ("gpt10m", "mlp10m", "demo", "tiny", "mlp_tiny", "gpt2_124m")

LR = 1e-3
WEIGHT_DECAY = 0.1
FUSED, FOREACH = "torch_adamw_fused", "torch_adamw_foreach"
BASELINES = (FUSED, FOREACH)

Factory = Callable[[List[dict]], object]


@dataclass(frozen=True)
class CandidateInfo:
    """What a candidate is, for the buffer counts and the bytes-moved floor (``analytic``).

    ``kind``: ``"torch_adamw"``, ``"rule"`` (``RuleOptimizer``, chunked eager path), ``"rule_fused"``
    (``RuleOptimizer(fused=True)``), ``"hyper"`` (``HyperOptimizer``, functional eager engine) or
    ``"hyper_fused"`` (``HyperOptimizer(fused=True)``). ``rule``: the family's registered name.
    ``tower``: number of hyper-optimizer levels.
    """

    kind: str
    rule: Optional[str] = None
    tower: int = 0


# name -> factory(param_groups) -> optimizer. Insertion order is the table's order.
CANDIDATES: Dict[str, Factory] = {}
CANDIDATE_INFO: Dict[str, CandidateInfo] = {}


def register(name: str, factory: Factory, *, replace: bool = False, info: Optional[CandidateInfo] = None) -> None:
    """Add a candidate ``factory(param_groups) -> object with .step()`` under ``name``.

    ``info`` (optional) lets ``--all`` count its buffers and bytes moved; without it those columns stay empty.
    """
    if name in CANDIDATES and not replace:
        raise ValueError(f"candidate {name!r} is already registered")
    CANDIDATES[name] = factory
    if info is not None:
        CANDIDATE_INFO[name] = info
    else:
        CANDIDATE_INFO.pop(name, None)


# One Family object per rule for the whole process: candidates built on the same family object can
# share compiled kernels (``_share_kernels``), and Dynamo's guards on the family then hold.
_FAMILIES: Dict[str, optimizers.Family] = {}


def family(name: str) -> optimizers.Family:
    fam = _FAMILIES.get(name)
    if fam is None:
        fam = _FAMILIES[name] = optimizers.get_rule(name)
    return fam


register(FUSED, lambda params: torch.optim.AdamW(params, lr=LR, fused=True), info=CandidateInfo("torch_adamw"))
register(FOREACH, lambda params: torch.optim.AdamW(params, lr=LR, foreach=True), info=CandidateInfo("torch_adamw"))

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


def _rule_factory(name: str, kwargs: dict, fused: bool = False) -> Factory:
    return lambda params: optimizers.RuleOptimizer(params, family(name), lr=LR, fused=fused, **kwargs)


for _name, _kwargs in RULE_KWARGS.items():
    register(_name, _rule_factory(_name, _kwargs), info=CandidateInfo("rule", _name))
register("mada", _rule_factory("mada", {}), info=CandidateInfo("rule", "mada"))

# The same rules through the fused path (one compiled in-place kernel per tensor; compiles during
# warm-up). NAdam's scalar buffer keeps it on the flat path.
for _name, _kwargs in {**RULE_KWARGS, "mada": {}}.items():
    register(f"{_name}_fused", _rule_factory(_name, _kwargs, fused=True), info=CandidateInfo("rule_fused", _name))

TOWER2 = lambda: [hypergrad.Level("adam", lr=1e-3, learn=["lr"]), hypergrad.Level("sgd", lr=1e-5)]  # noqa: E731
TOWER3 = lambda: [hypergrad.Level("adam", lr=1e-3, learn=["lr"]), hypergrad.Level("sgd", lr=1e-5, learn=["lr"]),  # noqa: E731
                  hypergrad.Level("sgd", lr=1e-7)]


def _mada_hyper(fused: bool, tower=None, **kwargs) -> Factory:
    """``hypergrad.MADA`` (all six coefficients learned) on the shared MADA family object."""
    def factory(params):
        return hypergrad.HyperOptimizer(params, family("mada"), lr=LR, fused=fused,
                                        tower=None if tower is None else tower(), **kwargs)
    return factory


# Hyper-learning MADA (all six coefficients, Adam hyper-optimizer) and a depth-2 tower
# (Adam's learning rate learned by SGD), on the functional (torch.func.vjp) backend.
register("mada_hyper", _mada_hyper(False), info=CandidateInfo("hyper", "mada", 1))
register("mada_tower2", _mada_hyper(False, TOWER2), info=CandidateInfo("hyper", "mada", 2))
# The same two on the fused path (compiled vjp kernel that advances the state + in-place update).
register("mada_hyper_fused", _mada_hyper(True), info=CandidateInfo("hyper_fused", "mada", 1))
register("mada_tower2_fused", _mada_hyper(True, TOWER2), info=CandidateInfo("hyper_fused", "mada", 2))
# The fused hyper step without the per-step non-finite check (nonfinite="ignore"): what that check costs.
register("mada_hyper_fused_nocheck", _mada_hyper(True, nonfinite="ignore"), info=CandidateInfo("hyper_fused", "mada", 1))
# The fused hyper step with the compiled kernels (the torch.func vjp, the traced update) instead of
# MADA's hand-written CPU ones (hypergrad.native, native=False): what those gain.
register("mada_hyper_fused_compiled", _mada_hyper(True, native=False), info=CandidateInfo("hyper_fused", "mada", 1))


def _check_rules_covered() -> None:
    missing = set(optimizers.RULES) - set(RULE_KWARGS) - set(SKIPPED_RULES)
    if missing:
        log.warning("rules in optimizers.RULES not benchmarked: %s (add them to RULE_KWARGS)", sorted(missing))


# Compiled kernels shared between optimizers built on the same family object (see module docstring).
_KERNEL_CACHE: Dict[tuple, dict] = {}


def _share_kernels(opt) -> None:
    """Point ``opt``'s private per-mode kernel caches at a per-process one (no-op if they are missing)."""
    fam = getattr(opt, "family", None)
    if fam is None or not getattr(opt, "fused", False):
        return
    if isinstance(getattr(opt, "_kernels", None), dict):
        key = ("rule", id(fam))
        opt._kernels = _KERNEL_CACHE.setdefault(key, opt._kernels)
    learn = getattr(opt, "learn", None)
    if learn and isinstance(getattr(opt, "_hyper_kernels", None), dict):
        key = ("hyper", id(fam), tuple(learn), getattr(opt, "native", True))
        opt._hyper_kernels = _KERNEL_CACHE.setdefault(key, opt._hyper_kernels)


def build_candidate(name: str, params: List[dict]):
    opt = CANDIDATES[name](params)
    _share_kernels(opt)
    return opt


# ------------------------------------------------------------------------------------------ setup
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_model(name: str, vocab_size: Optional[int] = None, device: Optional[torch.device] = None,
               **overrides) -> torch.nn.Module:
    """The benchmark model. Char GPTs use the Shakespeare vocabulary size (84, their config's) without
    loading the data; ``gpt2_124m`` GPT-2's (50304).

    ``mlp_tiny`` is a small MLP for tests; ``overrides`` replace config fields (``hidden=...``).
    """
    key = {"gpt10m": "bench10m"}.get(name, name)
    if key == "mlp_tiny":
        key, overrides = "mlp10m", {"in_features": 32, "hidden": 48, "n_hidden_layers": 2, **overrides}
    if key not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; allowed: {MODEL_CHOICES}")
    if isinstance(CONFIGS[key], GPTConfig):
        model = build_model(key, vocab_size=vocab_size or CONFIGS[key].vocab_size, **overrides)
    else:
        model = build_model(key, **overrides)
    return model.to(device) if device is not None else model


class GradientSets:
    """Two fixed sets of N(0, 1e-2) gradients for a model's parameters; ``sets(r)`` points every
    ``.grad`` at set ``r % 2`` (no copy; ``time_steps`` calls it before each round, untimed).

    1e-2 keeps squares far from denormals. Two sets keep ``g - g_prev`` away from zero, as in
    training: with one fixed gradient it is exactly 0 from the second step on, and MADA's difference
    moment ``n_t = beta3 n + (1 - beta3)(g - g_prev)`` then decays as ``beta3^t``; with ``beta3``
    learned to ~2e-3 it crossed the float32 denormal range around step 14, where arithmetic on it
    costs ~100 cycles, and the hyper-learning steps 14-19 ran 2-3.5x slower than the others.
    """

    def __init__(self, model: torch.nn.Module, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.params = list(model.parameters())
        self.sets = [[(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-2).to(p.device) for p in self.params]
                     for _ in range(2)]
        self(0)

    def __call__(self, r: int) -> None:
        for p, g in zip(self.params, self.sets[r % 2]):
            p.grad = g

    @property
    def gradients(self) -> List[torch.Tensor]:
        """Every gradient tensor of both sets (not optimizer state: excluded from its byte counts)."""
        return [g for gs in self.sets for g in gs]


def machine_info(device: Optional[torch.device] = None) -> dict:
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
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gb"] = round(int(line.split()[1]) / 2 ** 20, 1)
                break
    except (OSError, ValueError, IndexError):
        pass
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> Optional[str]:
    """HEAD's commit, with ``-dirty`` when the working tree has changes; None outside git. The
    environment's ``HYPERGRAD_GIT_COMMIT``, where set, instead: a copy of the tree sent to a GPU
    machine carries no reliable ``.git`` (one such copy reported an older HEAD, dirty)."""
    if os.environ.get("HYPERGRAD_GIT_COMMIT"):
        return os.environ["HYPERGRAD_GIT_COMMIT"]
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


def _sync_fn(device: Optional[torch.device]) -> Callable[[], None]:
    if device is not None and device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def round_order(names: Sequence[str], r: int, seed: int = 0) -> List[str]:
    """The order of round ``r``: a permutation of ``names`` drawn from a generator seeded by ``(seed, r)``.
    (Rotating one fixed order, as this script first did, keeps each candidate after the same one in
    most rounds: in the tower table depth 2 mostly followed depth 1 and measured +6.5% over it, where a
    separate run of the two alone measured -3%.)"""
    return random.Random(seed * 1_000_003 + r).sample(list(names), len(names))


def time_steps(optims: Dict[str, object], steps: int, warmup: int, progress: bool = True,
               faults: Optional[Dict[str, List[int]]] = None, device: Optional[torch.device] = None,
               desc: str = "bench rounds", before_round: Optional[Callable[[int], None]] = None
               ) -> Dict[str, List[float]]:
    """Round-robin: each round steps every optimizer once. Returns the timed steps in ms per name.

    The order is shuffled each round (``round_order``), so no candidate mostly follows the same one
    (a candidate that frees large temporaries makes the next one pay page faults to map memory again,
    and one that streams hundreds of MB leaves the next one cold caches).

    ``faults``, if given, receives each timed step's count of minor page faults per name: a step that
    allocates fresh large temporaries pays for them in page faults (kernel time), which fused
    kernels never do. On CUDA the device is synchronized before each timer reading.
    ``before_round(r)``, if given, runs before round ``r``, untimed (``GradientSets``: the gradient swap).
    """
    sync = _sync_fn(device)
    times: Dict[str, List[float]] = {name: [] for name in optims}
    order = list(optims)
    rounds = range(warmup + steps)
    if progress:
        from tqdm import tqdm
        rounds = tqdm(rounds, desc=desc, file=sys.stderr, leave=False)
    for r in rounds:
        if r == warmup:
            gc.collect()
        if before_round is not None:
            before_round(r)
        for name in round_order(order, r):
            opt = optims[name]
            sync()
            f0 = _minor_faults()
            t0 = time.perf_counter_ns()
            opt.step()
            sync()
            elapsed = time.perf_counter_ns() - t0
            if r >= warmup:
                times[name].append(elapsed / 1e6)
                if faults is not None:
                    faults.setdefault(name, []).append(_minor_faults() - f0)
    return times


def _stats(ts: Sequence[float]) -> dict:
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) >= 2 else [ts[0]] * 3
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "p25_ms": q[0], "p75_ms": q[2], "n": len(ts)}


def paired_ratio(ts: Sequence[float], ref: Sequence[float]) -> dict:
    """Median and quartiles of the per-round ratios ``ts[r] / ref[r]`` (robust to drift between rounds)."""
    rs = [a / b for a, b in zip(ts, ref)]
    q = statistics.quantiles(rs, n=4, method="inclusive") if len(rs) >= 2 else [rs[0]] * 3
    return {"median": statistics.median(rs), "p25": q[0], "p75": q[2]}


def paired_diff(ts: Sequence[float], ref: Sequence[float]) -> float:
    """Median of the per-round differences ``ts[r] - ref[r]`` (ms)."""
    return statistics.median(a - b for a, b in zip(ts, ref))


def summarise(times: Dict[str, List[float]], faults: Optional[Dict[str, List[int]]] = None) -> Dict[str, dict]:
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    results = {}
    for name, ts in times.items():
        results[name] = {"median_ms": medians[name], "ratio_to_fused": medians[name] / medians[FUSED],
                         "ratio_to_foreach": medians[name] / medians[FOREACH]}
        results[name].update({k: v for k, v in _stats(ts).items() if k != "median_ms"})
        results[name]["paired_ratio_to_fused"] = paired_ratio(ts, times[FUSED])
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


def _select(only: Optional[Sequence[str]]) -> List[str]:
    names = list(CANDIDATES)
    if only:
        unknown = [n for n in only if n not in CANDIDATES]
        if unknown:
            raise ValueError(f"unknown candidate(s) {unknown}; allowed: {list(CANDIDATES)}")
        names = [n for n in CANDIDATES if n in BASELINES or n in set(only)]
    return names


def run(model_name: str = "gpt10m", steps: int = 20, warmup: int = 2, only: Optional[Sequence[str]] = None,
        seed: int = 0, progress: bool = True, device: Optional[torch.device] = None, slow_steps: int = 3) -> dict:
    """Benchmark and return the report dict (see the module docstring): ``step_table``'s two groups,
    fast candidates with ``steps`` timed rounds and eager ones with ``slow_steps``."""
    if steps < 1 or warmup < 0 or slow_steps < 1:
        raise ValueError(f"steps and slow_steps must be >= 1 and warmup >= 0, got {steps}, {slow_steps}, {warmup}")
    _check_rules_covered()
    device = torch.device(device) if device is not None else default_device()
    names = _select(only)
    load_before = _loadavg()
    table = step_table(model_name, names, steps, warmup, slow_steps, device, seed, progress)
    machine = machine_info(device)
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
            "n_params": table["n_params"],
            "param_tensors": table["param_tensors"],
            "dtype": "torch.float32",
            "device": str(device),
            "steps": steps,
            "slow_steps": slow_steps,
            "warmup": warmup,
            "seed": seed,
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "weight_decay_on": "dim >= 2 (experiments.model.param_groups)",
            "grad": "two fixed N(0, 1e-2) sets, alternating round by round",
            "order": "round-robin, one step per candidate per round, order shuffled each round (seeded); "
                     "eager candidates in a group of their own with both baselines",
            "threads": torch.get_num_threads(),
        },
        "results": table["results"],
    }


# ================================================================================ --all (issue #5)
# Targets of issue #5, as numbers the verdicts compare against.
TARGET_HYPER = 2.5          # hyper-learning MADA step / fused AdamW step
TARGET_RULE = 2.0           # MADA without hyper-learning, and every vertex rule / fused AdamW
TARGET_TRAIN = 1.15         # whole train step with hyper MADA / with fused AdamW
TARGET_BUFFERS = 8          # optimizer state + hypergradient residuals, in parameter-sized buffers
TARGET_PEAK = 1.5           # measured peak above the model / buffer-count prediction
TARGET_TOWER = 0.02         # extra cost of each tower level
ADAMW_BYTES = 7             # fused AdamW: read p, g, m, v; write p, m, v

HYPER_MAIN = "mada_hyper_fused"      # the hyper-learning candidate the verdicts use (the faster path)
SCALING_CANDIDATES = (FUSED, "mada_fused", HYPER_MAIN)
TRAIN_CANDIDATES = (FUSED, "mada_fused", HYPER_MAIN, "mada_hyper")
TOWERS = {1: None, 2: TOWER2, 3: TOWER3}


def tensor_states(fam: optimizers.Family) -> List:
    """The family's parameter-sized buffers (scalar buffers such as NAdam's running product excluded)."""
    return [s for s in fam.states if not s.scalar]


def fused_rotation(fam: optimizers.Family) -> int:
    """1 where the fused hyper path rotates a family's gradient record into the state that is the
    gradient (``Family.gradient_states``, MADA's g_prev; ``hypergrad.fused._update``), else 0: the
    buffers it keeps (S + 2 - a) and the buffers its update writes (S + 2 - a)."""
    return int(bool(fam.gradient_states))


def eager_hyper_buffers(fam: optimizers.Family, weight_decay: float, mode: str) -> Tuple[int, bool]:
    """Parameter-sized buffers the eager hyper path keeps for ``fam`` (the model's coefficients learned,
    not lr), and whether one of them is a copy of x: the S buffers, left at the state before the last
    update (the next step's vjp advances them), the recorded gradient (1), and a copy of x only where
    the vjp reads it (L2 decay, or a rule that reads x: ``HyperOptimizer._vjp_reads_x``)."""
    S = len(tensor_states(fam))
    decay = optimizers.needs_param(fam, weight_decay, mode)
    x_copy = decay and (fam.uses_param or mode not in ("decoupled", "proximal"))
    return S + 1 + int(x_copy), x_copy


def analytic(name: str, groups: Optional[List[dict]] = None) -> Optional[dict]:
    """Parameter-sized buffers kept between steps, and bytes moved per parameter per step (in units of
    one parameter-sized buffer), as derived from the code paths (see ``write_doc`` for the derivations).

    ``groups``: the model's param groups (``[{"params", "weight_decay"}]``); the eager hyper path keeps a
    copy of x only for parameters whose group has weight decay, so its count is a numel-weighted mean.
    Returns None for a candidate without ``CandidateInfo``.
    """
    info = CANDIDATE_INFO.get(name)
    if info is None:
        return None
    if info.kind == "torch_adamw":
        return {"buffers": 2.0, "buffers_formula": "2 (exp_avg, exp_avg_sq)", "floor_bytes": 7.0,
                "floor_formula": "read p, g, m, v; write p, m, v", "states": 2}
    fam = family(info.rule)
    S = len(tensor_states(fam))
    if info.kind in ("rule", "rule_fused"):
        return {"buffers": float(S), "buffers_formula": f"S = {S}", "floor_bytes": float(2 * S + 3),
                "floor_formula": f"2S+3 = {2 * S + 3}", "states": S}
    if info.kind == "hyper_fused":  # a = 1: the record rotates into g_prev's buffer (hypergrad.fused._update)
        a = fused_rotation(fam)
        return {"buffers": float(S + 2 - a), "buffers_formula": f"S+{2 - a} = {S + 2 - a} (state, {2 - a} g record"
                                                                f"{'s' if a == 0 else ''})",
                "floor_bytes": float(3 * S + 7 - a),
                "floor_formula": f"(S+2) vjp + (2S+{5 - a}) update = {3 * S + 7 - a}", "states": S}
    if info.kind == "hyper":
        alias = len(fam.gradient_states)  # (g_prev = g: the recorded gradient becomes that buffer)
        total, count, xfrac, l2frac = 0, 0.0, 0.0, 0.0
        for g in groups or [{"params": [torch.empty(1)], "weight_decay": WEIGHT_DECAY}]:
            n = sum(p.numel() for p in g["params"])
            c, x_copy = eager_hyper_buffers(fam, g.get("weight_decay", 0.0),
                                            g.get("weight_decay_mode", fam.weight_decay_mode))
            total += n
            count += n * c
            xfrac += n * (1 if x_copy else 0)
            l2frac += n * (1 if g.get("weight_decay_mode", fam.weight_decay_mode) == "l2"
                           and g.get("weight_decay", 0.0) != 0 else 0)
        count, xfrac, l2frac = count / max(total, 1), xfrac / max(total, 1), l2frac / max(total, 1)
        # a state whose new value is the raw gradient (g_prev) becomes the record, unwritten (not with
        # L2 decay: there its new value is g + wd x)
        written = alias * (1 - l2frac)
        formula = f"S+1+x = {count:.2f} (x copy on {xfrac:.1%} of params)"
        floor = 3 * S + 6 - written + 2 * xfrac
        return {"buffers": count, "buffers_formula": formula, "floor_bytes": floor,
                "floor_formula": f"3S+6-a+2x = {floor:.2f}", "states": S}
    raise ValueError(f"unknown candidate kind {info.kind!r}")


def is_slow(name: str) -> bool:
    """Eager candidates (tens of times slower than fused AdamW at 10M parameters) get fewer rounds."""
    info = CANDIDATE_INFO.get(name)
    return info is not None and info.kind in ("rule", "hyper")


# ------------------------------------------------------------------------------------------ memory
def _storage_key(t: torch.Tensor) -> Tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def reachable_bytes(opt, exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of distinct tensor storages reachable from the optimizer object (its ``state``, buffers,
    records of the last update, spare buffers...), parameters and their gradients excluded. Follows
    dicts, lists, tuples, ``__slots__`` and ``__dict__`` of the engine's own helper objects."""
    skip = {_storage_key(t) for t in exclude}
    seen_obj, seen_storage, total = set(), set(), 0
    stack = [v for k, v in vars(opt).items() if k not in ("param_groups", "defaults")]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_obj:
            continue
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            key = _storage_key(obj)
            if key not in skip and key not in seen_storage:
                seen_storage.add(key)
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):  # (dict's own methods: a lagging opt.state[p] would compute the current state)
            stack.extend(dict.keys(obj))
            stack.extend(dict.values(obj))
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif type(obj).__module__.split(".")[0] in ("optimizers", "hypergrad") and not isinstance(obj, optimizers.Family):
            for slot in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, slot):
                    stack.append(getattr(obj, slot))
            stack.extend(getattr(obj, "__dict__", {}).values())
    return total


def profile_memory(opt, steps: int, device: torch.device) -> dict:
    """Allocator bytes over ``steps`` steps of a fresh optimizer: peak and final level above the level
    before the first step, and the bytes allocated by the last step. CUDA: the caching allocator's
    statistics; CPU: the allocation events of ``torch.profiler(profile_memory=True)``."""
    sync = _sync_fn(device)
    if device.type == "cuda":
        sync()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps - 1):
            opt.step()
        sync()
        peak_before_last = torch.cuda.max_memory_allocated(device) - base
        before = torch.cuda.memory_stats(device).get("allocated_bytes.all.allocated", 0)
        level = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        opt.step()
        sync()
        last_alloc = torch.cuda.memory_stats(device).get("allocated_bytes.all.allocated", 0) - before
        peak_last = torch.cuda.max_memory_allocated(device) - level
        final = torch.cuda.memory_allocated(device) - base
        return {"peak": max(peak_before_last, peak_last + level - base), "final": final, "last_step_alloc": last_alloc,
                "last_step_transient": peak_last}
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for k in range(steps):
            with record_function(f"bench_step_{k}"):
                opt.step()
    events = list(prof.profiler.kineto_results.events())
    last = [e for e in events if e.name() == f"bench_step_{steps - 1}"]
    t_last = (last[0].start_ns(), last[0].end_ns()) if last else (None, None)
    mem = sorted(((e.start_ns(), i, e.nbytes()) for i, e in enumerate(events) if e.name() == "[memory]"))
    level = peak = 0
    level_before_last = None
    peak_last = 0
    last_alloc = 0
    for t, _, nbytes in mem:
        in_last = t_last[0] is not None and t_last[0] <= t <= t_last[1]
        if in_last and level_before_last is None:
            level_before_last = level
        level += nbytes
        peak = max(peak, level)
        if in_last:
            peak_last = max(peak_last, level - level_before_last)
            last_alloc += max(nbytes, 0)
    return {"peak": peak, "final": level, "last_step_alloc": last_alloc, "last_step_transient": peak_last}


def memory_table(model_name: str, names: Sequence[str], device: torch.device, seed: int = 0, steps: int = 3,
                 progress: bool = True) -> dict:
    """(b) per candidate: buffers counted from the code, and measured on a fresh optimizer over its first
    ``steps`` steps (the hyper engines start learning at step 2, so step 3 is a steady step)."""
    torch.manual_seed(seed)
    model = make_model(model_name, device=device)
    GradientSets(model, seed)  # every .grad at set 0: the memory table needs no second set
    params = list(model.parameters())
    pbytes = sum(p.numel() * p.element_size() for p in params)
    exclude = params + [p.grad for p in params]
    groups = param_groups(model, WEIGHT_DECAY)
    results = {}
    it = names
    if progress:
        from tqdm import tqdm
        it = tqdm(names, desc=f"memory {model_name}", file=sys.stderr, leave=False)
    for name in it:
        gc.collect()
        opt = build_candidate(name, param_groups(model, WEIGHT_DECAY))
        m = profile_memory(opt, steps, device)
        reach = reachable_bytes(opt, exclude)
        a = analytic(name, groups)
        r = {"measured_buffers": m["final"] / pbytes, "reachable_buffers": reach / pbytes,
             "peak_buffers": m["peak"] / pbytes, "step_alloc_buffers": m["last_step_alloc"] / pbytes,
             "step_transient_buffers": m["last_step_transient"] / pbytes}
        if a is not None:
            r["analytic_buffers"] = a["buffers"]
            r["analytic_formula"] = a["buffers_formula"]
            r["peak_over_prediction"] = m["peak"] / pbytes / a["buffers"] if a["buffers"] else None
        results[name] = r
        del opt
    ref = results.get(FUSED, {}).get("peak_buffers")
    for r in results.values():
        r["peak_vs_fused_adamw"] = r["peak_buffers"] / ref if ref else None
    return {"model": model_name, "n_params": count_parameters(model), "param_bytes": pbytes, "steps": steps,
            "method": ("torch.cuda allocator statistics" if device.type == "cuda"
                       else "torch.profiler(profile_memory=True) allocation events"),
            "results": results}


# ------------------------------------------------------------------------------------------ (a) step table
def step_table(model_name: str, names: Sequence[str], steps: int, warmup: int, slow_steps: int, device: torch.device,
               seed: int = 0, progress: bool = True) -> dict:
    """(a) Interleaved step times, in two groups each with both baselines: fast candidates (torch, fused)
    with ``steps`` timed rounds, eager ones with ``slow_steps`` (they are 10-200x slower; their ratios
    need no more precision). Ratios are to the fused AdamW of the same group."""
    torch.manual_seed(seed)
    model = make_model(model_name, device=device)
    before_round = GradientSets(model, seed)
    params = list(model.parameters())
    exclude = params + before_round.gradients
    pbytes = sum(p.numel() * p.element_size() for p in params)
    groups = param_groups(model, WEIGHT_DECAY)
    fast = [n for n in names if n in BASELINES or not is_slow(n)]
    slow = [n for n in names if n in BASELINES or is_slow(n)]
    results: Dict[str, dict] = {}
    for label, group, n_steps, n_warm in (("fast", fast, steps, warmup), ("slow", slow, slow_steps, 1)):
        if len(group) == len(BASELINES) and label == "slow":
            continue
        optims = {n: build_candidate(n, param_groups(model, WEIGHT_DECAY)) for n in group}
        faults: Dict[str, List[int]] = {}
        t0 = time.perf_counter()
        times = time_steps(optims, n_steps, n_warm, progress=progress, faults=faults, device=device,
                           desc=f"{model_name} {label}", before_round=before_round)
        log.info("step table %s/%s: %d candidates, %.0f s", model_name, label, len(group), time.perf_counter() - t0)
        summary = summarise(times, faults)
        for n in group:
            if n in BASELINES and n in results:
                continue  # the baselines' numbers come from the fast group (more rounds)
            r = summary[n]
            r["group"] = label
            r["reachable_buffers"] = reachable_bytes(optims[n], exclude) / pbytes
            a = analytic(n, groups)
            if a is not None:
                r["floor_bytes"] = a["floor_bytes"]
                r["floor_ratio"] = a["floor_bytes"] / ADAMW_BYTES
                r["floor_efficiency"] = r["floor_ratio"] / r["ratio_to_fused"]
                r["achieved_gb_s"] = a["floor_bytes"] * pbytes / (r["median_ms"] * 1e-3) / 1e9
            results[n] = r
        del optims
        gc.collect()
    return {"model": model_name, "n_params": count_parameters(model), "param_tensors": len(params),
            "param_bytes": pbytes, "steps": steps, "slow_steps": slow_steps, "warmup": warmup, "results": results}


# ------------------------------------------------------------------------------------------ (d) train step
def train_table(model_name: str, batch: int, names: Sequence[str], steps: int, warmup: int, device: torch.device,
                seed: int = 0, project_batch: Optional[int] = None, progress: bool = True,
                autocast: Optional[torch.dtype] = None) -> dict:
    """(d) Whole train step (zero_grad, forward, backward, step) per candidate, each on its own copy of
    the same initial model, same batch per round (random tokens: the cost does not depend on the data),
    round-robin. Dropout as configured (nanoGPT's Shakespeare config trains with 0.2). ``autocast``: the
    forward pass under ``torch.autocast(device, dtype)`` (parameters and optimizer stay float32).
    Reports tokens per second and, on CUDA, the peak memory of each candidate's step above what is
    resident before it, and the bytes of its optimizer state."""
    sync = _sync_fn(device)
    torch.manual_seed(seed)
    base = make_model(model_name, device=device)
    cfg = base.config
    models = {n: copy.deepcopy(base) for n in names}
    del base
    optims = {n: build_candidate(n, param_groups(models[n], WEIGHT_DECAY)) for n in names}
    gen = torch.Generator().manual_seed(seed)
    cuda = device is not None and device.type == "cuda"
    ctx = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast is not None else contextlib.nullcontext
    resident: Dict[str, int] = {}
    peaks: Dict[str, int] = {}
    fb: Dict[str, List[float]] = {n: [] for n in names}
    st: Dict[str, List[float]] = {n: [] for n in names}
    tot: Dict[str, List[float]] = {n: [] for n in names}
    rounds = range(warmup + steps)
    if progress:
        from tqdm import tqdm
        rounds = tqdm(rounds, desc=f"train {model_name}", file=sys.stderr, leave=False)
    for r in rounds:
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=gen).to(device)
        y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=gen).to(device)
        if r == warmup:
            gc.collect()
        for n in round_order(list(names), r):  # shuffled each round, as in time_steps
            model, opt = models[n], optims[n]
            opt.zero_grad(set_to_none=True)
            sync()
            if cuda and r == warmup + steps - 1:  # last round: this candidate's peak above what is resident
                resident[n] = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter_ns()
            with ctx():
                _, loss = model(x, y)
            loss.backward()
            sync()
            t1 = time.perf_counter_ns()
            opt.step()
            sync()
            t2 = time.perf_counter_ns()
            if cuda and r == warmup + steps - 1:
                peaks[n] = torch.cuda.max_memory_allocated(device) - resident[n]
            if r >= warmup:
                fb[n].append((t1 - t0) / 1e6)
                st[n].append((t2 - t1) / 1e6)
                tot[n].append((t2 - t0) / 1e6)
    ref = statistics.median(tot[FUSED])
    fb_pool = statistics.median([v for n in names for v in fb[n]])
    results = {}
    for n in names:
        r = {"step_ms": statistics.median(tot[n]), "fwd_bwd_ms": statistics.median(fb[n]),
             "opt_step_ms": statistics.median(st[n]), "ratio_to_fused": statistics.median(tot[n]) / ref,
             "paired_ratio_to_fused": paired_ratio(tot[n], tot[FUSED]), "n": len(tot[n]),
             "tokens_per_s": batch * cfg.block_size / (statistics.median(tot[n]) / 1e3),
             "optimizer_state_mb": _state_bytes(optims[n]) / 2 ** 20}
        if n in peaks:
            r["step_peak_mb"] = peaks[n] / 2 ** 20
        if project_batch and project_batch != batch:
            F = fb_pool * project_batch / batch
            r["projected_ratio"] = (F + r["opt_step_ms"]) / (F + statistics.median(st[FUSED]))
        results[n] = r
    return {"model": model_name, "n_params": count_parameters(models[names[0]]), "batch": batch,
            "block_size": cfg.block_size, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "dropout": cfg.dropout,
            "steps": steps, "warmup": warmup, "project_batch": project_batch, "fwd_bwd_pooled_ms": fb_pool,
            "autocast": None if autocast is None else str(autocast), "device": str(device), "results": results}


def _state_bytes(opt) -> int:
    """Bytes of the distinct tensor storages in an optimizer's ``state`` (and, for a hyper-optimizer,
    its records and gradient buffers), parameters excluded. Not ``reachable_bytes``: that walks every
    object and, reading a fused hyper-optimizer's ``state`` item by item, materializes its lazily
    computed current state (S buffers it does not keep); ``dict(s)`` copies the stored buffers."""
    seen, total = set(), 0

    def visit(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            key = obj.untyped_storage().data_ptr()
            if key not in seen and obj.numel() > 1:
                seen.add(key)
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)
    visit([dict(s) for s in opt.state.values()])
    visit([{k: v for k, v in r.items() if k != "params"} for r in getattr(opt, "_records0", None) or []])
    visit(list(getattr(opt, "_grad_record", {}).values()))
    return total


# ------------------------------------------------------------------------------------------ (e) scaling
def mlp_width(target_params: float) -> int:
    """Width h of the 3-layer square MLP (in = hidden = h, 10 outputs) with about ``target_params``
    parameters (3h^2 + 13h + 10), rounded to a multiple of 32."""
    h = (-13 + math.sqrt(169 + 12 * (target_params - 10))) / 6
    return max(32, int(round(h / 32)) * 32)


class _Call:
    """A kernel call with the ``.step()`` that ``time_steps`` times."""

    def __init__(self, fn: Callable[[], object]):
        self.step = fn


# Same reads, writes and reductions as the kernels of table (g), with next to no arithmetic: what the
# memory traffic alone costs on this machine (per byte it depends on how many streams a loop reads).
def _vjp_io(g_last, g, *states, reductions: int):
    """Reads S + 2 buffers, returns ``reductions`` sums (the hyper kernel: one per learned coefficient)."""
    first = g * (states[0] + g_last)
    sums = [first.sum()] + [(g * b).sum() for b in states[1:reductions]]
    if reductions > len(states):
        sums += [(g * g_last).sum()] * (reductions - len(states))
    rest = states[reductions:]
    if rest:  # more buffers than sums: they still have to be read once
        sums[-1] = sums[-1] + (g * sum(rest[1:], rest[0])).sum()
    return torch.stack(sums)


def _rule_io(x, g, *states):
    """Reads S + 2 buffers, writes S + 1 (the fixed rule's traffic): each buffer an EMA of ``g``, ``x``
    moved by their sum."""
    for b in states:
        b.mul_(0.9).add_(g * 0.1)
    x.add_(sum(states[1:], states[0]) * -1e-3)


def _update_io(x, g, g_last, *states):
    """Reads S + 3 buffers, writes S + 1 (the hyper update kernel's traffic, rotating): ``_rule_io`` on
    the gradient difference for all but the last buffer, which is read and receives the gradient (the
    new record, in MADA's g_prev buffer)."""
    d = g - g_last
    for b in states[:-1]:
        b.mul_(0.9).add_(d * 0.1)
    x.add_(sum(states[1:], states[0]) * -1e-3)
    states[-1].copy_(g)


def _one_pass(family_, mode, names, learn, fixed_names, h_names, pre_ids):
    """The what-if kernel *one_pass* of table (g), not part of the library: the vjp of the recorded update
    and the next update in one loop, as a scheme that applied each hypergradient one step late could
    run them (this update's coefficients would not wait for this step's reduction). It reads the S
    buffers before the recorded update, its gradient, the new gradient and x; it writes the state
    after the recorded update to S *other* buffers (Inductor fuses a reduction into the loop of an
    update only when the update does not overwrite what the reduction reads), x, and the gradient
    record: the update kernel's 2S + 5 buffers."""
    from hypergrad.fused import _advance, _materialized, _partial
    S, F, H, P = len(names), len(fixed_names), len(h_names), len(pre_ids)

    def one_pass(x, g, *rest):
        old, new, (g_last, g_store, q) = rest[:S], rest[S:2 * S], rest[2 * S:2 * S + 3]
        sc = rest[2 * S + 3:]
        fixed, sc = dict(zip(fixed_names, sc[:F])), sc[F:]
        h, t, sc = dict(zip(h_names, sc[:H])), sc[H], sc[H + 1:]
        pre, sc = dict(zip(pre_ids, sc[:P])), sc[P:]
        h_old, t_old, pre_old = dict(zip(h_names, sc[:H])), sc[H], dict(zip(pre_ids, sc[H + 1:]))
        # (materialized: the state is computed once, written, and read by the update in the same loop)
        advanced = {n: _materialized(v) for n, v in
                    _advance(family_, mode, g_last, dict(zip(names, old)), h_old, t_old, pre_old).items()}
        delta, _ = displacement(family_, g, advanced, x, h, t, mode, pre)
        partial_and_sum = _partial(family_, mode, names, learn, g_last, old, g, q, fixed, t_old)
        for n, b in zip(names, new):
            b.copy_(advanced[n])
        g_store.copy_(g)
        x.add_(delta)
        return partial_and_sum

    return one_pass


def _vjp_bound(res: Dict[str, dict]) -> str:
    """What bounds the vjp kernel, from table (g): its arithmetic alone (in cache) against its traffic
    alone (vjp_io, measured) and against the bytes model's floor."""
    vjp = res["vjp"]
    text = f" The vjp kernel's arithmetic alone is {vjp['arith_ratio']:.2f}x"
    io = res.get("vjp_io")
    if io is None:
        return text + (f", against its {vjp['floor_ratio']:.2f}x floor of bytes: "
                       + ("it is bound by its arithmetic." if vjp["arith_ratio"] > vjp["floor_ratio"]
                          else "its bytes weigh more than its arithmetic."))
    ratio = vjp["arith_ratio"] / io["ratio_to_fused"]
    verdict = ("its arithmetic and its reads bound it about equally" if 0.8 <= ratio <= 1.25 else
               "it is bound by its arithmetic" if ratio > 1.25 else "it is bound by its reads")
    return (text + f" and its memory traffic alone (vjp_io) {io['ratio_to_fused']:.2f}x, where the bytes model's "
            f"floor says {vjp['floor_ratio']:.2f}x: {verdict} (the kernel: {vjp['ratio_to_fused']:.2f}x).")


def _reads_paragraph(res: Dict[str, dict], S: int) -> Optional[str]:
    """Table (g)'s floors counted in buffers *read*, with the cost per buffer that the traffic-only
    kernels measured: vjp_io reads S + 2 buffers and writes none, rule_io reads the same S + 2 and
    writes S + 1 back. (None without those rows.)"""
    if "vjp_io" not in res or "rule_io" not in res:
        return None
    vjp_io, rule_io, adamw = res["vjp_io"]["median_ms"], res["rule_io"]["median_ms"], res[FUSED]["median_ms"]
    per_read = vjp_io / (S + 2)
    write_share = (rule_io - vjp_io) / (S + 1) / per_read  # a buffer written back, in buffers read
    measured = (f"rule_io, which reads the same S + 2 = {S + 2} buffers as vjp_io and writes S + 1 = {S + 1} of them "
                f"back, costs {rule_io / vjp_io:.2f}x vjp_io: "
                + ("writing a buffer back after reading it cost nothing measurable" if write_share < 0.05 else
                   f"a buffer written back after it was read cost {write_share:.2f} of one read"))
    if write_share >= 0.5:
        return f"Reads and writes: {measured}, so the bytes model above, which counts a write as a read, holds here."
    least = 2 * S + 4
    this = (S + 2) + (S + 3)
    return (f"Writes cost little on this machine: {measured}. (Presumably with few cores streaming, how many reads a "
            f"core keeps in flight sets the rate, not the memory's bandwidth.) The bytes model above counts a write as "
            f"a read, so for a kernel that only reads (the vjp) its *floor x* and its *efficiency* come out too low. "
            f"Counted in buffers read: fused AdamW reads 4 (p, g, m, v); the fixed MADA rule S + 2 = {S + 2}, "
            f"{(S + 2) / 4:.2f}x; any exact hyper-learning step at least 2S + 4 = {least} (the reduction reads the new "
            f"gradient, the state before the last update and its gradient; the update reads the parameters, the new "
            f"gradient and the state, if the reduction wrote the advanced state back), {least / 4:.2f}x at fused "
            f"AdamW's own time per buffer read and {least * per_read / adamw:.2f}x at vjp_io's "
            f"({per_read:.2f} ms per buffer). This scheme reads {this} (its update reads the recorded gradient again "
            f"to advance the state), {this * per_read / adamw:.2f}x at vjp_io's rate, and its two kernels took "
            f"{res['vjp']['ratio_to_fused'] + res['update']['ratio_to_fused']:.2f}x.")


def _c_floor_paragraph(res: Dict[str, dict], S: int) -> Optional[str]:
    """Table (g)'s floors measured, not counted: the plain-C loops with the least traffic of an exact hyper
    step (c_hyper_io) and of the fixed rule (c_rule_io), against the targets. (None without those rows.)"""
    if "c_hyper_io" not in res or "c_rule_io" not in res:
        return None
    hyper, rule = res["c_hyper_io"]["ratio_to_fused"], res["c_rule_io"]["ratio_to_fused"]
    adamw = res.get("c_adamw", {}).get("ratio_to_fused")

    def against(x, target):  # within 5% of it: "at" (the spread of paired ratios on this machine)
        return (f"above the {target}x target" if x > 1.05 * target else
                f"within the {target}x target" if x < 0.95 * target else
                f"at the {target}x target, before any arithmetic")
    return (f"Measured in plain C with next to no arithmetic: the least traffic of any exact hyper-learning step "
            f"(c_hyper_io: {2 * S + 4} buffers read, {S + 1} written) costs {hyper:.2f}x fused AdamW, "
            f"{against(hyper, TARGET_HYPER)}; the fixed MADA rule's traffic (c_rule_io: {S + 2} read, {S + 1} written) "
            f"{rule:.2f}x, {against(rule, TARGET_RULE)}"
            + (f"; AdamW's own update written the same way (c_adamw) {adamw:.2f}x" if adamw is not None else "")
            + (": no implementation of the exact algorithms gets under the targets on this machine, however its "
               "loops are written; their memory traffic alone costs more."
               if hyper > 1.05 * TARGET_HYPER and rule > 1.05 * TARGET_RULE else "."))


def _kernel_calls(numel: int, device: torch.device, seed: int = 0
                  ) -> Tuple[Dict[str, object], Dict[str, int], int, int]:
    """The calls of ``kernel_table`` on tensors of ``numel`` elements: ``(calls, floors B/p, S, reductions)``."""
    from hypergrad.fused import HyperKernels
    from hypergrad.native import MadaPartial, MadaUpdate
    from optimizers.fused import FusedKernel

    fam = family("mada")
    names, S = fam.state_names, len(fam.state_names)
    learn = tuple(n for n, c in fam.coefficients.items() if c.learnable)
    gen = torch.Generator().manual_seed(seed)
    f32 = dict(dtype=torch.float32, device=device)

    def randn(scale):
        return (torch.randn(numel, generator=gen) * scale).to(**f32)

    def placed(t, slot):  # as the optimizers place their buffers (optimizers.functional.flat_buffer)
        return flat_buffer(t.numel(), t.dtype, t.device, slot).copy_(t)

    # x and g are the user's (the parameters and their gradients); the S states and the gradient
    # record are the optimizer's, in slots 1..S+1
    x, g, g_last = randn(1.0), randn(1e-2), placed(randn(1e-2), S + 1)
    states = [placed((torch.rand(numel, generator=gen) * 1e-4).to(**f32), k + 1) for k in range(S)]
    rule_states = {n: placed(b, k + 1) for k, (n, b) in enumerate(zip(names, states))}
    x_rule = x.clone()
    f64 = dict(dtype=torch.float64, device=device)
    h = {n: torch.tensor(float(c.init), **f64) for n, c in fam.coefficients.items()}
    h.update(beta3=torch.tensor(0.1, **f64), c=torch.tensor(0.9, **f64), gamma=torch.tensor(0.9, **f64),
             lr=torch.tensor(LR, **f64), weight_decay=torch.tensor(WEIGHT_DECAY, **f64))
    t_old, t = torch.tensor(4.0, **f64), torch.tensor(5.0, **f64)
    kern = HyperKernels(fam, "decoupled", learn)  # as the library runs it: MADA's native vjp on a CPU
    q = torch.stack([h[n] for n in learn]).to(torch.float32)
    vjp = kern.partial_for({n: v for n, v in h.items() if n not in learn}, t_old)
    # the compiled kernels, which the native ones replace (where they do)
    compiled = HyperKernels(fam, "decoupled", learn, native=False)
    vjp_compiled = compiled.partial_for({n: v for n, v in h.items() if n not in learn}, t_old)
    pre, pre_old = kern.scalars(h, t), kern.scalars(h, t_old)
    update = kern.update_for(h, t, pre, (h, t_old, pre_old), True, rotate=True)  # as the library runs MADA
    update_compiled = compiled.update_for(h, t, pre, (h, t_old, pre_old), True, rotate=True)
    x_compiled, states_compiled = x.clone(), [placed(b, k + 1) for k, b in enumerate(states)]
    rule = FusedKernel(fam, "decoupled")
    p_adamw = torch.nn.Parameter(x.clone())
    p_adamw.grad = g.clone()
    adamw = torch.optim.AdamW([p_adamw], lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    io_states = [placed(b, k + 1) for k, b in enumerate(states)]
    x_io, x_io_rule = x.clone(), x.clone()
    io_rule_states = [placed(b, k + 1) for k, b in enumerate(states)]
    fixed = {n: v for n, v in h.items() if n not in learn}
    one_pass = TensorKernel(_one_pass(fam, "decoupled", names, learn, tuple(fixed), tuple(h), tuple(pre)), "one_pass")
    one_pass_bound = one_pass.bind(*fixed.values(), *h.values(), t, *pre.values(), *h.values(), t_old,
                                   *pre_old.values())
    x_one, g_one_store = x.clone(), flat_buffer(numel, torch.float32, device, 2 * S + 3)
    one_old = [placed(b, k + 1) for k, b in enumerate(states)]
    one_new = [flat_buffer(numel, torch.float32, device, S + 3 + k) for k in range(S)]
    vjp_io = TensorKernel(functools.partial(_vjp_io, reductions=len(learn)), "vjp_io")
    update_io, rule_io = TensorKernel(_update_io, "update_io"), TensorKernel(_rule_io, "rule_io")
    calls = {FUSED: adamw,
             "vjp": _Call(lambda: vjp(g_last, states, g, q)),
             "vjp_compiled": _Call(lambda: vjp_compiled(g_last, states, g, q)),
             "update": _Call(lambda: update(x, g, states, g_last, None)),
             "update_compiled": _Call(lambda: update_compiled(x_compiled, g, states_compiled, g_last, None)),
             "rule": _Call(lambda: rule([x_rule], [g], rule_states, h, 5.0)),
             "one_pass": _Call(lambda: one_pass_bound(x_one, g, *one_old, *one_new, g_last, g_one_store, q)),
             "vjp_io": _Call(lambda: vjp_io(g_last, g, *io_states)),
             "update_io": _Call(lambda: update_io(x_io, g, g_last, *io_states)),
             "rule_io": _Call(lambda: rule_io(x_io_rule, g, *io_rule_states))}
    a = fused_rotation(fam)
    floors_c = {}
    loops = _traffic_loops(S) if device.type == "cpu" else None
    if loops is not None:  # the same traffic in plain C (experiments.traffic): the least a loop costs for it
        x_c, m_c, v_c = x.clone(), placed(torch.zeros(numel), 1), placed(torch.zeros(numel), 2)
        c_states, x_c_rule, x_c_hyper = [placed(b, k + 1) for k, b in enumerate(states)], x.clone(), x.clone()
        calls.update({"c_adamw": _Call(lambda: loops.adamw(x_c, g, m_c, v_c, lr=LR, beta1=0.9, beta2=0.999, eps=1e-8,
                                                           weight_decay=WEIGHT_DECAY, step=5)),
                      "c_vjp_io": _Call(lambda: loops.vjp_io(g, g_last, c_states)),
                      "c_rule_io": _Call(lambda: loops.rule_io(x_c_rule, g, c_states)),
                      "c_hyper_io": _Call(lambda: loops.hyper_io(x_c_hyper, g, g_last, c_states))})
        floors_c = {"c_adamw": 7, "c_vjp_io": S + 2, "c_rule_io": 2 * S + 3, "c_hyper_io": 3 * S + 5}
    if not isinstance(vjp, MadaPartial):  # no native kernel here: the two rows would be the same kernel
        del calls["vjp_compiled"]
    if not isinstance(update, MadaUpdate):
        del calls["update_compiled"]
    floors = {FUSED: 7, "vjp": S + 2, "vjp_compiled": S + 2, "update": 2 * S + 5 - a,
              "update_compiled": 2 * S + 5 - a, "rule": 2 * S + 3, "one_pass": 2 * S + 5,
              "vjp_io": S + 2, "update_io": 2 * S + 5 - a, "rule_io": 2 * S + 3, **floors_c}
    return calls, floors, S, len(learn)


@functools.lru_cache(maxsize=None)
def _traffic_loops(S: int):
    """``experiments.traffic.TrafficLoops(S)``, or None (logged once) where they cannot be built."""
    from experiments.traffic import TrafficLoops
    try:
        return TrafficLoops(S)
    except RuntimeError as exc:
        log.warning("table (g): no plain-C traffic rows (%s)", exc)
        return None


def kernel_table(numel: int, steps: int, warmup: int, device: torch.device, seed: int = 0,
                 progress: bool = True, in_cache_sizes: Sequence[int] = (4096, 20480),
                 in_cache_calls: int = 100, in_cache_rounds: int = 60) -> dict:
    """(g) The two compiled kernels of a fused hyper-learning MADA step, each timed alone on one flat
    float32 tensor of ``numel`` elements (no Python loop over tensors, no packing), interleaved with
    ``torch.optim.AdamW(fused=True)`` on a tensor of the same size and with the plain MADA update kernel:

    * ``vjp``: the partial hypergradient of the recorded update (reads the S buffers before it, its
      gradient and the new gradient: S + 2), ``HyperKernels.partial_for``: on a CPU, MADA's
      hand-written kernel (``hypergrad.native``) where it could be built;
    * ``vjp_compiled``: the same with the compiled ``torch.func`` vjp it replaces (only where it does);
    * ``update``: the model update that first advances the buffers past the recorded update, then
      records this one into g_prev's buffer (reads S + 3, writes S + 1: the rotation the library
      runs for MADA), ``HyperKernels.update_for``: on a CPU, MADA's hand-written kernel too;
    * ``update_compiled``: the same with the compiled kernel it replaces (only where it does);
    * ``rule``: the fixed-coefficient MADA update (2S + 3), ``FusedKernel``;
    * ``one_pass``: a what-if, not in the library (``_one_pass``): the vjp and the next update in one
      loop, as a scheme applying each hypergradient one step late could run them (2S + 5).

    *floor B/p* as in table (a); *efficiency* = floor x / measured x: near 1 a kernel moves bytes as
    fast as fused AdamW does, well below 1 it is bound by its arithmetic instead.

    ``vjp_io``, ``update_io``, ``rule_io``: kernels compiled the same way with the same reads, writes
    and reductions (one per learned coefficient) but next to no arithmetic: the cost of the memory
    traffic alone, as this machine serves it (a loop reading many streams gets fewer bytes per second
    than fused AdamW's four).

    ``in_cache_sizes`` (two sizes, default 4096 and 20480 elements: the 17 buffers of the largest
    kernel fit a core's L2 cache): each kernel is also timed on tensors of these sizes
    (``in_cache_ns``: ``in_cache_calls`` calls back to back per reading, ``in_cache_rounds`` rounds),
    and the median difference between the two sizes per element is its cost without memory traffic
    or per-call overhead: the arithmetic (*in-cache ns/el*). Against
    fused AdamW's whole step per element on the large tensor (*arith x*), it is a second floor,
    next to the traffic-only kernels': a kernel cannot run faster than its arithmetic."""
    calls, floors, S, reductions = _kernel_calls(numel, device, seed)
    times = time_steps(calls, steps, warmup, progress, device=device, desc=f"kernels {numel / 1e6:.1f}M")
    ref = statistics.median(times[FUSED])
    results = {}
    for n, ts in times.items():
        med = statistics.median(ts)
        floor_x = floors[n] / 7
        results[n] = {"median_ms": med, "ratio_to_fused": med / ref,
                      "paired_ratio_to_fused": paired_ratio(ts, times[FUSED]), "n": len(ts),
                      "floor_bytes": floors[n], "floor_ratio": floor_x, "floor_efficiency": floor_x / (med / ref),
                      "achieved_gb_s": floors[n] * numel * 4 / (med / 1e3) / 1e9}
    if in_cache_sizes:
        per_element = in_cache_ns(in_cache_sizes, in_cache_calls, in_cache_rounds, device, seed, progress)
        adamw_ns = results[FUSED]["median_ms"] * 1e6 / numel
        for n, ns in per_element.items():
            results[n]["in_cache_ns"] = ns
            results[n]["arith_ratio"] = ns / adamw_ns
    return {"numel": numel, "states": S, "reductions": reductions, "steps": steps, "results": results,
            "in_cache_sizes": list(in_cache_sizes or ()), "in_cache_calls": in_cache_calls,
            "in_cache_rounds": in_cache_rounds}


def in_cache_ns(sizes: Sequence[int], calls_per_reading: int, rounds: int, device: torch.device, seed: int = 0,
                progress: bool = True) -> Dict[str, float]:
    """Per kernel of ``kernel_table``: nanoseconds per element with its tensors in cache, from two sizes
    (``sizes``, small enough for a core's L2): each reading times ``calls_per_reading`` calls back to
    back, both sizes in each of ``rounds`` interleaved rounds; the median over rounds of the
    difference between the two sizes, per element, removes the per-call overhead, and the caches
    remove the memory traffic."""
    if len(sizes) != 2 or not 0 < sizes[0] < sizes[1]:
        raise ValueError(f"in_cache_sizes must be two sizes, smaller first, got {sizes!r}")
    batches = {}
    for size in sizes:
        calls, _, _, _ = _kernel_calls(size, device, seed)
        for n, c in calls.items():
            if n == "rule":  # FusedKernel's whole step API: ~100 us of Python per call, too noisy to subtract
                continue
            batches[f"{n}@{size}"] = _Call(lambda c=c: [c.step() for _ in range(calls_per_reading)])
    times = time_steps(batches, rounds, 2, progress, device=device, desc="kernels in cache")
    small, large = sizes
    names = dict.fromkeys(key.rsplit("@", 1)[0] for key in batches)
    return {n: statistics.median(a - b for a, b in zip(times[f"{n}@{large}"], times[f"{n}@{small}"])) * 1e6
            / calls_per_reading / (large - small) for n in names}


def scaling_table(sizes_m: Sequence[float], names: Sequence[str], steps: int, warmup: int, device: torch.device,
                  seed: int = 0, progress: bool = True) -> dict:
    """(e) Step time against parameter count: square 3-layer MLPs, interleaved candidates per size."""
    rows = []
    for m in sizes_m:
        h = mlp_width(m * 1e6)
        torch.manual_seed(seed)
        model = make_model("mlp10m", device=device, in_features=h, hidden=h, n_hidden_layers=3)
        before_round = GradientSets(model, seed)
        optims = {n: build_candidate(n, param_groups(model, WEIGHT_DECAY)) for n in names}
        times = time_steps(optims, steps, warmup, progress=progress, device=device, desc=f"scaling {m}M",
                           before_round=before_round)
        n_params = count_parameters(model)
        row = {"target_m": m, "width": h, "n_params": n_params, "results": {}}
        for n in names:
            med = statistics.median(times[n])
            row["results"][n] = {"median_ms": med, "ms_per_m": med / (n_params / 1e6),
                                 "ratio_to_fused": med / statistics.median(times[FUSED])}
        rows.append(row)
        del optims, model
        gc.collect()
    fits = {}
    for n in names:
        xs = [r["n_params"] / 1e6 for r in rows]
        ys = [r["results"][n]["median_ms"] for r in rows]
        fits[n] = linear_fit(xs, ys)
    return {"steps": steps, "warmup": warmup, "rows": rows, "fits": fits}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """Least squares ``y = a + b x``: intercept, slope, R^2 and the largest relative residual."""
    n = len(xs)
    if n < 2:
        return {"intercept_ms": None, "slope_ms_per_m": None, "r2": None, "max_rel_residual": None}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept_ms": a, "slope_ms_per_m": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
            "max_rel_residual": max(abs(y - a - b * x) / y for x, y in zip(xs, ys))}


# ------------------------------------------------------------------------------------------ (f) tower
def tower_table(model_name: str, steps: int, warmup: int, device: torch.device, fused: bool = True, seed: int = 0,
                progress: bool = True) -> dict:
    """(f) MADA hyper-learning with towers of depth 1, 2, 3, interleaved; cost of each extra level as
    the median over rounds of the paired ratio depth k+1 / depth k, and of the paired difference in ms.

    The tower's levels run the same code on both paths (``fused`` only changes the model update), on
    vectors of a few coefficients: their cost does not grow with the model. ``run_all`` therefore also
    measures them on a tiny model, where a fraction of a millisecond is resolvable, and relates that
    to the large model's step."""
    torch.manual_seed(seed)
    model = make_model(model_name, device=device)
    before_round = GradientSets(model, seed)
    optims = {FUSED: build_candidate(FUSED, param_groups(model, WEIGHT_DECAY))}
    for depth, tower in TOWERS.items():
        opt = _mada_hyper(fused, tower)(param_groups(model, WEIGHT_DECAY))
        _share_kernels(opt)
        optims[f"depth{depth}"] = opt
    times = time_steps(optims, steps, warmup, progress=progress, device=device, desc=f"tower {model_name}",
                       before_round=before_round)
    results = {}
    for depth in TOWERS:
        name = f"depth{depth}"
        r = _stats(times[name])
        r["ratio_to_fused"] = r["median_ms"] / statistics.median(times[FUSED])
        r["tower"] = [repr(lv) for lv in optims[name].tower]
        if depth > 1:
            r["extra_vs_previous"] = paired_ratio(times[name], times[f"depth{depth - 1}"])
            r["extra_vs_depth1"] = paired_ratio(times[name], times["depth1"])
            r["extra_ms_vs_previous"] = paired_diff(times[name], times[f"depth{depth - 1}"])
        results[name] = r
    return {"model": model_name, "n_params": count_parameters(model), "fused": fused, "steps": steps,
            "warmup": warmup, "fused_adamw_ms": statistics.median(times[FUSED]), "results": results}


INTERVALS = (1, 2, 4, 8)


def interval_table(model_name: str, intervals: Sequence[int], steps: int, warmup: int, device: torch.device,
                   seed: int = 0, progress: bool = True) -> dict:
    """(h) Fused MADA hyper-learning every k steps (``HyperOptimizer(hyper_interval=k)``), interleaved with
    fused AdamW and the fixed-coefficient fused MADA rule (``mada_fused``).

    A step's cost depends on its place in the cycle of k, read off the optimizer (whether it holds
    a record before and after the step): a *recording* step (reads the state, writes only the
    parameters and the gradient record), a *learning* one (the vjp kernel, then an update that
    advances the state past the recorded one) and k - 2 *plain* rule updates (k = 1: every step
    records and learns). *amortized x*: per cycle of k consecutive
    timed steps, their total time over fused AdamW's total in the same rounds; the median over the
    cycles. ``steps`` should be a multiple of every k (each cycle then holds each kind once). The
    untimed rounds are at least ``max(intervals) + 1``, so that every kind of step has run (and
    compiled its kernels) before the timing starts."""
    warmup = max(warmup, max(intervals) + 1)
    torch.manual_seed(seed)
    model = make_model(model_name, device=device)
    before_round = GradientSets(model, seed)
    optims = {FUSED: build_candidate(FUSED, param_groups(model, WEIGHT_DECAY)),
              "mada_fused": build_candidate("mada_fused", param_groups(model, WEIGHT_DECAY))}
    for k in intervals:
        opt = _mada_hyper(True, hyper_interval=k)(param_groups(model, WEIGHT_DECAY))
        _share_kernels(opt)
        optims[f"every{k}"] = opt
    # whether each optimizer holds a record before each round (and after the last): a step learns when
    # it finds one, and has recorded its update when it leaves one
    holds: Dict[int, List[bool]] = {k: [] for k in intervals}

    def before(r):
        before_round(r)
        for k in intervals:
            holds[k].append(optims[f"every{k}"]._records0 is not None)

    times = time_steps(optims, steps, warmup, progress=progress, device=device, desc=f"interval {model_name}",
                       before_round=before)
    for k in intervals:
        holds[k].append(optims[f"every{k}"]._records0 is not None)
    ref = times[FUSED]
    results = {}
    for k in intervals:
        ts = times[f"every{k}"]
        cycles = [sum(ts[i:i + k]) / sum(ref[i:i + k]) for i in range(0, len(ts) - k + 1, k)]
        kinds: Dict[str, List[float]] = {}
        for i, (a, b) in enumerate(zip(ts, ref)):
            learned, recorded = holds[k][warmup + i], holds[k][warmup + i + 1]
            kind = ("every" if learned and recorded else "learning" if learned else "recording" if recorded
                    else "plain")
            kinds.setdefault(kind, []).append(a / b)
        results[f"every{k}"] = {"interval": k, "amortized_ratio": statistics.median(cycles), "cycles": len(cycles),
                                "mean_ratio": sum(ts[:len(cycles) * k]) / sum(ref[:len(cycles) * k]),
                                "kind_ratios": {n: statistics.median(v) for n, v in kinds.items()},
                                "kind_counts": {n: len(v) for n, v in kinds.items()}}
    rule = paired_ratio(times["mada_fused"], ref)["median"]
    return {"model": model_name, "n_params": count_parameters(model), "steps": steps, "warmup": warmup,
            "fused_adamw_ms": statistics.median(ref), "mada_fused_ratio": rule, "results": results}


# ------------------------------------------------------------------------------------------ verdicts
def verdicts(report: dict) -> List[dict]:
    """One line per target of issue #5: what was measured, and whether it meets the target."""
    out = []

    def add(target, measured, met, note=""):
        out.append({"target": target, "measured": measured, "met": met, "note": note})

    steps = report.get("step", {})
    io = (report.get("kernels") or {}).get("results", {})
    hyper_io = (f"; its memory traffic alone (g): {io['vjp_io']['ratio_to_fused'] + io['update_io']['ratio_to_fused']:.2f}x"
                if "vjp_io" in io else "")
    if "arith_ratio" in io.get("vjp", {}):
        hyper_io += f"; its arithmetic alone (g): {io['vjp']['arith_ratio'] + io['update']['arith_ratio']:.2f}x"
    rule_io = f"; mada's traffic alone (g): {io['rule_io']['ratio_to_fused']:.2f}x" if "rule_io" in io else ""
    if "c_hyper_io" in io:  # the least traffic of the algorithm, in plain C
        hyper_io += f"; least traffic of any exact hyper step, plain C (g): {io['c_hyper_io']['ratio_to_fused']:.2f}x"
    if "c_rule_io" in io:
        rule_io += f"; in plain C (g): {io['c_rule_io']['ratio_to_fused']:.2f}x"
    for model, tab in steps.items():
        res = tab["results"]
        hyper = [n for n in (HYPER_MAIN, "mada_hyper") if n in res]
        if hyper:
            best = min(hyper, key=lambda n: res[n]["ratio_to_fused"])
            r = res[best]["ratio_to_fused"]
            floor = res[best].get("floor_ratio")
            add(f"hyper MADA step <= {TARGET_HYPER}x fused AdamW ({model})", f"{r:.2f}x ({best})", r <= TARGET_HYPER,
                (f"bytes-moved floor {floor:.2f}x" if floor else "") + hyper_io)
        # The target names MADA and its vertex rules (Adam, AMSGrad, AVGrad, Adan, Yogi, Lion); the
        # toolkit's other rules are reported against the same bound, as information.
        vertices = ["mada", "adam", "amsgrad", "avgrad", "adan", "yogi", "lion"]
        for label, rules, target in ((f"MADA (hyper off) and every vertex rule <= {TARGET_RULE}x fused AdamW", vertices,
                                      True),
                                     (f"the other rules vs {TARGET_RULE}x fused AdamW (report only)",
                                      [r for r in RULE_KWARGS if r not in vertices], False)):
            worst = []
            for rule in rules:
                paths = [n for n in (f"{rule}_fused", rule) if n in res]
                if not paths:
                    continue
                best = min(paths, key=lambda n: res[n]["ratio_to_fused"])
                worst.append((res[best]["ratio_to_fused"], best, res[best].get("floor_ratio")))
            if not worst:
                continue
            failing = [w for w in worst if w[0] > TARGET_RULE]
            text = ", ".join(f"{b} {r:.2f}x" for r, b, _ in sorted(worst, reverse=True))
            below_floor = [b for r, b, f in failing if f is not None and f > TARGET_RULE]
            add(f"{label} ({model}; best path per rule)", text, (not failing) if target else None,
                (f"{len(failing)} of {len(worst)} over; bytes-moved floor over {TARGET_RULE}x for: "
                 f"{', '.join(below_floor)}" + rule_io if failing and below_floor
                 else f"{len(failing)} of {len(worst)} over" if failing else ""))
    for key, tab in report.get("train", {}).items():
        res = tab["results"]
        for n in (HYPER_MAIN, "mada_hyper"):
            if n not in res:
                continue
            r = res[n]["ratio_to_fused"]
            proj = res[n].get("projected_ratio")
            note = f"projected at batch {tab['project_batch']}: {proj:.2f}x" if proj else ""
            add(f"whole train step with hyper MADA <= {TARGET_TRAIN}x fused AdamW ({key}, {n}, batch {tab['batch']})",
                f"{r:.2f}x", r <= TARGET_TRAIN, note)
    mem = report.get("memory")
    if mem:
        res = mem["results"]
        fast_kinds = ("torch_adamw", "rule_fused", "hyper_fused")
        for label, fast in (("fused path", True), ("eager path", False)):
            subset = {n: r for n, r in res.items() if CANDIDATE_INFO.get(n)
                      and (CANDIDATE_INFO[n].kind in fast_kinds) == fast}
            hyper = {n: r for n, r in subset.items() if CANDIDATE_INFO[n].kind in ("hyper", "hyper_fused")}
            over = {n: r for n, r in subset.items() if r.get("analytic_buffers", 0) > TARGET_BUFFERS + 1e-9}
            text = ", ".join(f"{n} {r['analytic_buffers']:.1f} (measured {r['measured_buffers']:.1f})"
                             for n, r in (over or hyper).items())
            add(f"optimizer state + hypergradient residuals <= {TARGET_BUFFERS} parameter-sized buffers ({label})",
                text or "no candidate", not over, "over: " + ", ".join(over) if over else "")
        far = {n: r for n, r in res.items() if r.get("peak_over_prediction") and r["peak_over_prediction"] > TARGET_PEAK}
        inplace = [r["peak_over_prediction"] for n, r in res.items() if r.get("peak_over_prediction")
                   and CANDIDATE_INFO.get(n) and CANDIDATE_INFO[n].kind in ("torch_adamw", "rule_fused", "hyper_fused")]
        add(f"measured peak above the model within {TARGET_PEAK}x of the buffer-count prediction",
            ", ".join(f"{n} {r['peak_over_prediction']:.2f}x" for n, r in far.items()) if far else "all within",
            not far, "; ".join(([f"torch and fused paths: at most {max(inplace):.2f}x"] if inplace else [])
                               + (["over: " + ", ".join(far)] if far else [])))
        if HYPER_MAIN in res:
            add("peak memory above the model vs fused AdamW (report only)",
                f"{res[HYPER_MAIN]['peak_vs_fused_adamw']:.2f}x ({HYPER_MAIN})", None, "")
    sc = report.get("scaling")
    if sc and len(sc["rows"]) >= 2:
        bad = []
        parts = []
        for n, fit in sc["fits"].items():
            per = [r["results"][n]["ms_per_m"] for r in sc["rows"]]
            growth = per[-1] / min(per[1:]) if len(per) > 2 else per[-1] / per[0]
            parts.append(f"{n}: R^2 {fit['r2']:.3f}, ms/M largest/least (>= 2nd size) {growth:.2f}")
            if fit["r2"] is None or fit["r2"] < 0.98 or growth > 1.25:
                bad.append(n)
        add("step time linear in parameter count, 1M to 50M (R^2 >= 0.98 and ms per M params at the largest "
            "size <= 1.25x the least from the 2nd size on)", "; ".join(parts), not bad, "")
    tw, small = report.get("tower"), report.get("tower_small")
    if tw:
        extras = [(d, tw["results"][d]["extra_vs_previous"]["median"] - 1) for d in ("depth2", "depth3")
                  if d in tw["results"]]
        direct = ", ".join(f"{d}: {e:+.1%}" for d, e in extras)
        est = tower_level_estimate(report)
        if est:
            text = ", ".join(f"{d}: {e:+.2%}" for d, e in est.items())
            add(f"each extra tower level costs < {TARGET_TOWER:.0%} ({tw['model']})",
                f"{text} (level cost measured on {small['model']}, over the {tw['model']} step)",
                all(e < TARGET_TOWER for e in est.values()), f"direct paired measurement on {tw['model']}: {direct}")
        else:
            add(f"each extra tower level costs < {TARGET_TOWER:.0%} ({tw['model']})", direct,
                all(e < TARGET_TOWER for _, e in extras), "")
    it = report.get("interval")
    if it:
        sparse = {r["interval"]: r["amortized_ratio"] for r in it["results"].values() if r["interval"] > 1}
        if sparse:
            add(f"hyper MADA learning every k steps (hyper_interval=k), fused, step averaged over k "
                f"(report only: the target above is for learning every step) ({it['model']})",
                ", ".join(f"k={k}: {r:.2f}x" for k, r in sparse.items()), None,
                f"table (h); every step: {it['results']['every1']['amortized_ratio']:.2f}x, the fixed rule "
                f"(mada_fused) {it['mada_fused_ratio']:.2f}x" if "every1" in it["results"] else "table (h)")
    return out


def tower_level_estimate(report: dict) -> Optional[Dict[str, float]]:
    """Extra cost of each tower level relative to the large model's depth-1 step: the level's paired
    extra milliseconds measured on the small model (same tower code, resolvable there), divided by the
    large model's depth-1 median step."""
    tw, small = report.get("tower"), report.get("tower_small")
    if not tw or not small:
        return None
    base = tw["results"]["depth1"]["median_ms"]
    return {d: small["results"][d]["extra_ms_vs_previous"] / base for d in ("depth2", "depth3")
            if d in small["results"]}


# ------------------------------------------------------------------------------------------ run_all
def run_all(models: Sequence[str] = ("gpt10m", "mlp10m"), only: Optional[Sequence[str]] = None, steps: int = 15,
            warmup: int = 2, slow_steps: int = 3, memory_model: Optional[str] = "gpt10m",
            memory_only: Optional[Sequence[str]] = None,
            train: Sequence[Tuple[str, str, int, Optional[int], int]] = (("demo", "demo", 16, None, 20),
                                                                         ("shakespeare", "gpt10m", 4, 64, 5)),
            train_candidates: Sequence[str] = TRAIN_CANDIDATES,
            scaling_sizes: Sequence[float] = (1, 5, 10, 25, 50), scaling_steps: int = 6,
            scaling_candidates: Sequence[str] = SCALING_CANDIDATES, tower_model: Optional[str] = "gpt10m",
            tower_steps: int = 30, tower_fused: bool = True, tower_small_model: Optional[str] = "tiny",
            tower_small_steps: int = 60, kernel_numel: int = 10_500_000, kernel_steps: int = 15,
            interval_model: Optional[str] = "gpt10m", intervals: Sequence[int] = INTERVALS, interval_steps: int = 32,
            device: Optional[torch.device] = None, seed: int = 0, progress: bool = True,
            partial_out: Optional[Path] = None) -> dict:
    """Every measurement of issue #5 in one process; returns the report (``"kind": "all"``).

    ``train``: ``(label, model, batch, project_batch, timed rounds[, autocast dtype])`` per whole-train-step
    table
    (``project_batch``: also give the ratio projected to that batch size, forward/backward scaled
    linearly). ``tower_small_model``: the tower table again on this (small) model, eager path, to
    resolve the absolute cost of a level. ``kernel_numel``: size of the flat tensor of the kernel
    table (g). ``interval_model``, ``intervals``, ``interval_steps``: table (h), hyper-learning every k
    steps. Empty sequences / None / 0 skip a phase. ``partial_out``: after each phase, the report so
    far is written there (``"complete": false``), so a run cut short (a lease's time limit) keeps the
    phases it finished.
    """
    device = torch.device(device) if device is not None else default_device()
    _check_rules_covered()
    names = _select(only)
    t_start = time.perf_counter()
    phases: Dict[str, dict] = {}
    report: Dict[str, object] = {"kind": "all", "torch": torch.__version__, "git_commit": git_commit(),
                                 "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                                 "argv": sys.argv[1:]}
    load_start = _loadavg()

    def phase(label, into, key, fn, *args, **kwargs):
        """Run one phase; its result goes to ``into[key]``."""
        la, t0 = _loadavg(), time.perf_counter()
        log.info("phase %s ...", label)
        into[key] = fn(*args, **kwargs)
        phases[label] = {"seconds": round(time.perf_counter() - t0, 1), "loadavg_before": la, "loadavg_after": _loadavg()}
        log.info("phase %s done in %.0f s (load %s -> %s)", label, phases[label]["seconds"], la, _loadavg())
        if partial_out is not None:
            partial_out.parent.mkdir(parents=True, exist_ok=True)
            partial_out.write_text(json.dumps({**report, "complete": False, "phases": phases,
                                               "machine": machine_info(device)}, indent=2, default=str) + "\n")

    report["step"] = {}
    for m in models:
        phase(f"step {m}", report["step"], m, step_table, m, names, steps, warmup, slow_steps, device, seed, progress)
    # the train step right after the step table: on a lent GPU, the rows asked for first
    report["train"] = {}
    for label, model, batch, proj, n_steps, *autocast in train:  # optional 6th entry: an autocast dtype
        phase(f"train {label}", report["train"], label, train_table, model, batch, train_candidates, n_steps, 1,
              device, seed, proj, progress, *autocast)
    if memory_model:
        mem_names = [n for n in (memory_only or names) if n in CANDIDATES]
        phase("memory", report, "memory", memory_table, memory_model, mem_names, device, seed, 3, progress)
    if tower_model:
        phase("tower", report, "tower", tower_table, tower_model, tower_steps, warmup, device, tower_fused, seed,
              progress)
    if tower_small_model:
        phase("tower small", report, "tower_small", tower_table, tower_small_model, tower_small_steps, warmup, device,
              False, seed, progress)
    if kernel_numel:
        phase("kernels", report, "kernels", kernel_table, kernel_numel, kernel_steps, warmup, device, seed, progress)
    if interval_model and intervals and interval_steps:
        phase("interval", report, "interval", interval_table, interval_model, intervals, interval_steps, warmup,
              device, seed, progress)
    if scaling_sizes:
        phase("scaling", report, "scaling", scaling_table, scaling_sizes, scaling_candidates, scaling_steps, 1, device,
              seed, progress)
    machine = machine_info(device)
    machine["loadavg_before"], machine["loadavg_after"] = load_start, _loadavg()
    if resource is not None:
        machine["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    report["machine"] = machine
    report["config"] = {"device": str(device), "dtype": "torch.float32", "threads": torch.get_num_threads(),
                        "lr": LR, "weight_decay": WEIGHT_DECAY,
                        "weight_decay_on": "dim >= 2 (experiments.model.param_groups)",
                        "grad": "fixed N(0, 1e-2), set once (step, memory, scaling, tower tables)", "seed": seed,
                        "steps": steps, "slow_steps": slow_steps, "warmup": warmup,
                        "train": [[str(x) if isinstance(x, torch.dtype) else x for x in t] for t in train],
                        "scaling_steps": scaling_steps, "tower_steps": tower_steps,
                        "tower_small_steps": tower_small_steps, "kernel_numel": kernel_numel,
                        "kernel_steps": kernel_steps, "interval_model": interval_model, "intervals": list(intervals),
                        "interval_steps": interval_steps}
    report["phases"] = phases
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["verdicts"] = verdicts(report)
    report["complete"] = True
    return report


# ------------------------------------------------------------------------------------------ the page
def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def _path(name: str) -> str:
    info = CANDIDATE_INFO.get(name)
    if info is None:
        return "?"
    return {"torch_adamw": "torch", "rule": "eager (chunked)", "rule_fused": "fused", "hyper": "hyper eager",
            "hyper_fused": "hyper fused"}[info.kind]


def _findings(report: dict) -> List[str]:
    """Sentences derived from the step and memory tables (only where the needed candidates ran)."""
    out = []
    for model, tab in report.get("step", {}).items():
        res = tab["results"]
        if not all(n in res for n in (HYPER_MAIN, "mada_hyper_fused_nocheck", "mada_fused")):
            continue
        hy, nc, mf = (res[n]["median_ms"] for n in (HYPER_MAIN, "mada_hyper_fused_nocheck", "mada_fused"))
        out.append(f"{model}: the fused hyper step takes {hy:.1f} ms ({res[HYPER_MAIN]['ratio_to_fused']:.2f}x fused "
                   f"AdamW, bytes-moved floor {res[HYPER_MAIN].get('floor_ratio', float('nan')):.2f}x). Without the "
                   f"per-step non-finite check (nonfinite='ignore') it takes {nc:.1f} ms: the check costs "
                   f"{hy - nc:.1f} ms ({(hy - nc) / hy:.0%} of the step). The vjp kernel plus the in-place "
                   f"update ({nc:.1f} ms) cost {nc / mf:.2f}x the plain fused MADA update ({mf:.1f} ms), for "
                   f"{res[HYPER_MAIN].get('floor_bytes', 0) / res['mada_fused'].get('floor_bytes', 1):.2f}x its "
                   f"floor bytes."
                   + (f" With the compiled kernels instead of MADA's hand-written CPU ones (native=False) the "
                      f"step takes {res['mada_hyper_fused_compiled']['median_ms']:.1f} ms "
                      f"({res['mada_hyper_fused_compiled']['ratio_to_fused']:.2f}x fused AdamW)."
                      if "mada_hyper_fused_compiled" in res else ""))
    mem = report.get("memory", {}).get("results", {})
    if HYPER_MAIN in mem and "mada_hyper_fused_nocheck" in mem:
        out.append(f"Memory ({report['memory']['model']}): the non-finite check allocates "
                   f"{mem[HYPER_MAIN]['step_alloc_buffers']:.2f} parameter-sized buffers per step "
                   f"(without it: {mem['mada_hyper_fused_nocheck']['step_alloc_buffers']:.2f}), i.e. it reads the "
                   f"gradients several times and writes temporaries, where the vjp kernel already reads every "
                   f"gradient once.")
    return out


def _step_rows(w, model: str, tab: dict, level: str = "###") -> None:
    """One optimizer-step table of the page (with the bytes-moved floor)."""
    w(f"{level} {model}: {tab['n_params'] / 1e6:.2f}M parameters in {tab['param_tensors']} tensors")
    w("")
    w("| optimizer | path | median ms | x fused AdamW | paired x (p25-p75) | floor B/p | floor x | efficiency "
      "| GB/s | rounds | faults/step |")
    w("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for n, r in tab["results"].items():
        pr = r["paired_ratio_to_fused"]
        w(f"| {n} | {_path(n)} | {r['median_ms']:.1f} | {r['ratio_to_fused']:.2f} | {pr['median']:.2f} "
          f"({pr['p25']:.2f}-{pr['p75']:.2f}) | {_f(r.get('floor_bytes'), '{:.0f}')} | {_f(r.get('floor_ratio'))} "
          f"| {_f(r.get('floor_efficiency'))} | {_f(r.get('achieved_gb_s'), '{:.1f}')} | {r['n']} "
          f"| {_f(r.get('minor_faults_per_step'), '{:.0f}')} |")
    w("")


def _memory_rows(w, mem: dict) -> None:
    """The measured-buffers table of the page."""
    w("| optimizer | path | analytic | formula | kept | reachable | peak | peak / analytic | peak vs fused AdamW "
      "| step transient | alloc/step |")
    w("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in mem["results"].items():
        w(f"| {n} | {_path(n)} | {_f(r.get('analytic_buffers'))} | {r.get('analytic_formula', '-')} "
          f"| {r['measured_buffers']:.2f} | {r['reachable_buffers']:.2f} | {r['peak_buffers']:.2f} "
          f"| {_f(r.get('peak_over_prediction'))} | {_f(r.get('peak_vs_fused_adamw'))} "
          f"| {r['step_transient_buffers']:.2f} | {r['step_alloc_buffers']:.2f} |")
    w("")


def _train_rows(w, label: str, tab: dict, device: str, level: str = "###") -> None:
    """One whole-train-step table of the page."""
    w(f"{level} {label}: {tab['model']} ({tab['n_params'] / 1e6:.2f}M parameters, {tab['n_layer']} layers, "
      f"{tab['n_embd']} wide, block {tab['block_size']}, batch {tab['batch']}, dropout {tab['dropout']}), "
      f"{tab['steps']} timed rounds, device {tab.get('device', device)}"
      + (f", forward in {tab['autocast']} autocast" if tab.get("autocast") else ""))
    w("")
    peak = any("step_peak_mb" in r for r in tab["results"].values())
    head = ("| optimizer | train step ms | fwd+bwd ms | opt step ms | x fused AdamW | paired x (p25-p75) "
            "| tokens/s | state MB |" + (" step peak MB |" if peak else ""))
    sep = "|---|---:|---:|---:|---:|---|---:|---:|" + ("---:|" if peak else "")
    if tab.get("project_batch") and tab["project_batch"] != tab["batch"]:
        head += f" projected x at batch {tab['project_batch']} |"
        sep += "---:|"
    w(head)
    w(sep)
    for n, r in tab["results"].items():
        pr = r["paired_ratio_to_fused"]
        line = (f"| {n} | {r['step_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['opt_step_ms']:.1f} "
                f"| {r['ratio_to_fused']:.3f} | {pr['median']:.3f} ({pr['p25']:.3f}-{pr['p75']:.3f}) "
                f"| {_f(r.get('tokens_per_s'), '{:.0f}')} | {_f(r.get('optimizer_state_mb'), '{:.1f}')} |"
                + (f" {_f(r.get('step_peak_mb'), '{:.1f}')} |" if peak else ""))
        if "projected_ratio" in r:
            line += f" {r['projected_ratio']:.3f} |"
        w(line)
    w("")


def _gpu_section(w, gpu: dict, diag: Optional[dict], page_commit: Optional[str], note: Optional[str] = None) -> None:
    """The page's GPU rows: an ``--all`` report measured on a CUDA device (``experiments/gpu_check.sh``)
    and, if given, ``experiments/gpu_diag.py``'s comparison of the ways of compiling the kernels."""
    m, cfg = gpu["machine"], gpu["config"]
    w(f"## GPU rows: GPT-2 124M shapes on {m.get('gpu')}")
    w("")
    w("Measured on a lent GPU machine by `bash experiments/gpu_check.sh`, i.e. `python -m experiments.bench_step "
      + " ".join(gpu.get("argv", [])) + "`; the JSON is committed beside this page. float32 parameters, "
      "gradients and optimizer state; the GPT-2 train step runs its forward in bf16 autocast. The issue's "
      "targets are set for the CPU: the verdicts below only place the GPU numbers against them.")
    w("")
    w("| | |")
    w("|---|---|")
    for k, v in (("date", gpu.get("date")), ("git commit", f"`{gpu.get('git_commit')}`"), ("torch", gpu["torch"]),
                 ("python", m.get("python")), ("device", f"{cfg['device']} ({m.get('gpu')})"),
                 ("host CPU", f"{m.get('cpu_model')} ({m.get('cpu_count')} logical cores)"),
                 ("total run time", f"{gpu['seconds']:.0f} s")):
        w(f"| {k} | {v} |")
    w("")
    if page_commit and gpu.get("git_commit") and gpu["git_commit"].split("-")[0] != page_commit.split("-")[0]:
        w(f"**Not this page's commit.** These rows were measured at `{gpu['git_commit'][:12]}`, the CPU rows above "
          f"at `{page_commit[:12]}`: what runs on the GPU may have changed in between (`git log "
          f"{gpu['git_commit'][:12]}..{page_commit[:12]}`). Rerun `experiments/gpu_check.sh` on a GPU to bring "
          "them up to date.")
        w("")
    if note:
        w(f"**Note on these rows** (`--gpu-note`, from whoever ran them): {note}")
        w("")
    w("| target | measured on the GPU | against the CPU target | note |")
    w("|---|---|---|---|")
    for v in gpu.get("verdicts", []):
        verdict = "report" if v["met"] is None else ("within" if v["met"] else "over")
        w(f"| {v['target']} | {v['measured']} | {verdict} | {v['note']} |")
    w("")
    w("### Optimizer step")
    w("")
    w("As in (a): fixed gradients, candidates interleaved, device synchronised around each step. *floor x* is "
      "the bytes-moved floor of (c); *GB/s* the floor's bytes over the median time (an H100's HBM3 moves "
      "about 3 TB/s).")
    w("")
    for model, tab in gpu["step"].items():
        _step_rows(w, model, tab, level="####")
    if gpu.get("train"):
        w("### Whole train step")
        w("")
        w("As in (d); *step peak MB*: the allocator's peak during the candidate's last train step above what was "
          "allocated before it.")
        w("")
        for label, tab in gpu["train"].items():
            _train_rows(w, label, tab, cfg["device"], level="####")
    if gpu.get("memory"):
        mem = gpu["memory"]
        w(f"### Buffers and peak memory ({mem['model']}, {mem['method']})")
        w("")
        _memory_rows(w, mem)
    if diag:
        w("### How the kernels are compiled on the GPU (`experiments/gpu_diag.py`)")
        w("")
        w(f"{diag.get('model')} shapes on {diag.get('gpu')}, torch {diag.get('torch')}, commit "
          f"`{diag.get('git_commit') or 'not recorded in its JSON'}`. Each variant builds fresh optimizers (fresh "
          "kernels) and times the step alone (median of 10, device synchronised); the kernels' times are "
          "torch.profiler's over two more steps; *step peak*: the allocator's peak during the timed steps above "
          "what was allocated before them, in parameter-sized buffers. Variants: "
          + "; ".join(f"*{v}*: {text}" for v, text in diag.get("variant_help", {
              "dynamic": "Dynamo with dynamic shapes, the GPU's route before the direct one",
              "static": "Dynamo with one compilation per tensor size",
              "direct": "`TensorKernel`'s direct Inductor route (the CPU's), the route fused kernels on contiguous "
                        "CUDA tensors take since"}).items()) + ".")
        w("")
        w("*kernels*: device kernels launched per step (where the JSON has them). The host's share of a step "
          "(cProfile's top functions, `host_top`) is in the JSON.")
        w("")
        w("| variant | optimizer | median ms | warm-up s | step peak | kernels | its longest kernels: ms per step "
          "(launches per step) |")
        w("|---|---|---:|---:|---:|---:|---|")
        for v, res in diag["variants"].items():
            for n, r in res.items():
                if "error" in r:
                    w(f"| {v} | {n} | failed: {r['error'][:120]} | | | | |")
                    continue
                kernels, seen = [], set()
                for name, count, ms in r["top_kernels"]:  # device kernels only (not ops or annotations), once each
                    if name.startswith(("Optimizer.step", "aten::", "cuda")) or name in seen:
                        continue
                    seen.add(name)
                    kernels.append(f"`{name[:48]}`: {ms:.2f} ({count // 2})")
                w(f"| {v} | {n} | {r['median_ms']:.2f} | {r['warmup_s']:.0f} | {_f(r.get('step_peak_buffers'))} "
                  f"| {_f(r.get('device_kernels_per_step'), '{:d}')} | {'; '.join(kernels[:3])} |")
        w("")


def write_doc(report: dict, path: Path, gpu: Optional[dict] = None, gpu_diag: Optional[dict] = None,
              gpu_note: Optional[str] = None, rendered_by: Optional[Sequence[str]] = None) -> str:
    """Generate ``docs/performance.md`` from an ``--all`` report; returns the text. Every number comes from
    ``report`` (and from ``gpu``, an ``--all`` report measured on a CUDA device, and ``gpu_diag``,
    ``experiments/gpu_diag.py``'s JSON: the page's GPU rows); the prose around the tables is fixed, but
    for ``gpu_note``, a note on the GPU rows from whoever ran them (what changed since, say).
    ``rendered_by``: the arguments of the ``--render`` command that wrote the page, if one did."""
    m = report["machine"]
    cfg = report["config"]
    L: List[str] = []
    w = L.append
    w("# Performance: the optimizer step, memory, scaling and towers (issue #5)")
    w("")
    w("Generated by `python -m experiments.bench_step " + " ".join(report.get("argv", [])) + "` (JSON: "
      f"`{report.get('out', 'runs/bench_step.json')}`); do not edit by hand, rerun the command. Every number below "
      "is the script's output."
      + (" This page was rendered from that JSON by `python -m experiments.bench_step " + " ".join(rendered_by) + "`."
         if rendered_by else ""))
    w("")
    w("## Machine and run")
    w("")
    w("| | |")
    w("|---|---|")
    rows = [("date", report.get("date")), ("git commit", f"`{report.get('git_commit')}`"), ("torch", report["torch"]),
            ("python", m.get("python")), ("device", cfg["device"] + (f" ({m['gpu']})" if m.get("gpu") else "")),
            ("CPU", f"{m.get('cpu_model')} ({m.get('cpu_count')} logical cores, {m.get('mem_total_gb')} GB)"),
            ("torch threads", f"{cfg['threads']} (OMP_NUM_THREADS={m.get('omp_num_threads_env')})"),
            ("platform", m.get("platform")), ("dtype", cfg["dtype"]),
            ("load average (1, 5, 15 min) before", m.get("loadavg_before")),
            ("load average after", m.get("loadavg_after")), ("peak RSS", f"{m.get('peak_rss_mb')} MB"),
            ("total run time", f"{report['seconds']:.0f} s")]
    for k, v in rows:
        w(f"| {k} | {v} |")
    w("")
    load = max((m.get("loadavg_before") or [0])[0], (m.get("loadavg_after") or [0])[0])
    cores = m.get("cpu_count") or 1
    w("**Noise.** The machine is shared: other jobs run alongside, and every timing here is disturbed by them. "
      "Candidates are interleaved round-robin (one step each per round, in an order shuffled every round), so the "
      "*ratios* compare like with like; "
      "absolute milliseconds are only indicative. Per phase load averages are listed at the end. "
      + (f"During this run the load average reached {load:.1f} on {cores} cores: expect ratios to move by 10-30% "
         f"between runs, and do not read differences of a few percent (the tower table) as resolved."
         if load > 0.5 * cores else "The machine was lightly loaded during this run."))
    if cfg["threads"] == 1 and cores > 1:
        w("")
        w(f"Threads: this run used 1 torch thread on a {cores}-core machine. Under load, a 2-thread OpenMP region "
          "waits for its slowest thread, and a descheduled thread stalls every small kernel (while preparing this "
          "report, steps ran several times slower with 2 threads than with 1 on this machine under load); one thread "
          "gives the steadier ratios, at the price of absolute times an idle machine would beat with 2.")
    w("")
    w("Setup common to the optimizer-step tables: float32 parameters whose `.grad` alternates, round by round, "
      "between two fixed sets of N(0, 1e-2) values (with a single fixed gradient, g - g_prev would be exactly 0 and "
      "MADA's difference moment would decay through the float32 denormals, where arithmetic is ~100x slower), "
      f"lr {cfg['lr']}, weight decay {cfg['weight_decay']} on matrices (`param_groups`), each candidate with "
      "its own state over the same parameters. Fused candidates compile during the untimed warm-up; their CPU "
      f"loops prefetch every buffer they stream, {PREFETCH_BYTES} bytes ahead (`optimizers/prefetch.py`: a hint that "
      "changes no value; without it a loop of many streams and much arithmetic left bandwidth unused). The kernels "
      "of table (g), the traffic-only ones included, are compiled the same way. Our optimizers' own buffers (the "
      "S states, the gradient records) start at distinct offsets in their 4 KiB pages "
      "(`optimizers.functional.flat_buffer`, buffer k shifted by k x 1088 bytes: streams that all start at the "
      "same page offset alias in the CPU's load/store checks and cache sets; measured ~8% on the hyper step), and "
      "table (g) places its kernels' buffers the same way; the parameters and gradients are the user's. torch's "
      "own fused AdamW has neither the hints nor the placement, so a kernel here can move its bytes faster than "
      "fused AdamW moves its own (*efficiency* above 1).")
    w("")

    # verdicts
    w("## Verdicts")
    w("")
    w("| target | measured | verdict | note |")
    w("|---|---|---|---|")
    for v in report["verdicts"]:
        verdict = "report" if v["met"] is None else ("**met**" if v["met"] else "**not met**")
        w(f"| {v['target']} | {v['measured']} | {verdict} | {v['note']} |")
    w("")

    # (a)+(c) step tables
    w("## (a) Optimizer step, and (c) the bytes-moved floor")
    w("")
    w("*floor B/p*: parameter-sized buffers a step must read plus write at the least, for the algorithm as this "
      "path runs it (one pass per kernel, nothing cached): fused AdamW 7 (read p, g, m, v; write p, m, v); a rule "
      "with S buffers 2S+3 (read p, g and S buffers, write p and S buffers); fused hyper-learning 3S+7-a: the vjp "
      "kernel recomputes the last update from its recorded inputs (read g_old, the S buffers as they were before "
      "it, and the new gradient as cotangent: S+2), then the update reads the S buffers and g_old, advances the "
      "state past the recorded update, reads p and g, and writes the S buffers, the new gradient record and p "
      "(2S+5-a; a = 1 for a rule with a state whose new value is the gradient, MADA's g_prev: that state is not "
      "written, the old record's buffer becomes its buffer and the new record goes to its old one); the eager "
      "hyper path (3S+6-a) reads the same S+2 in its vjp and writes the advanced state there "
      "(S, less the a states whose new value is the recorded gradient, which becomes their buffer: MADA's g_prev), "
      "then reads p, g and the S buffers and writes p and the gradient record (S+4), and also records a copy of x "
      "where its vjp reads it (+2: L2 decay, a rule that reads x, a learned lr). On a "
      "memory-bound CPU step, *floor x* = floor / 7 is the best ratio to fused AdamW the algorithm can reach, "
      "and *efficiency* = floor x / measured x (1.0: as close to the bandwidth floor as fused AdamW). "
      "*GB/s*: floor bytes over the median time. Eager candidates run in a separate interleaved group with fewer "
      "rounds (*rounds*), each group with its own fused AdamW; their ratios are to that group's fused AdamW.")
    w("")
    for model, tab in report["step"].items():
        _step_rows(w, model, tab)

    findings = _findings(report)
    if findings:
        w("### What the step tables say about the hyper-learning step")
        w("")
        for f in findings:
            w(f"- {f}")
        w("")

    # (b) memory
    mem = report.get("memory")
    if mem:
        w("## (b) Buffers and peak memory")
        w("")
        w(f"Model {mem['model']} ({mem['n_params'] / 1e6:.2f}M parameters, {mem['param_bytes'] / 2 ** 20:.1f} MiB "
          f"per parameter-sized buffer). Counts are in parameter-sized buffers.")
        w("")
        w("*analytic*: from the code. torch AdamW keeps exp_avg and exp_avg_sq (2). A rule keeps its S = "
          "`len(family.states)` parameter-sized buffers (scalar buffers, NAdam's running product, are not counted); "
          "both the eager path (chunk by chunk) and the fused path update them in place. Hyper-learning "
          "keeps, besides the S buffers, the inputs of the last update for the next step's vjp: the fused path "
          "leaves the S buffers at the state before the last update (the next update advances them) and keeps the "
          "gradient record (with L2 decay it holds g + wd x, so no copy of x): S+1 for a rule with a state whose new "
          "value is the gradient (MADA's g_prev; the record and that state's buffer trade roles each step), S+2 "
          "otherwise (two records used alternately: a kernel never overwrites the record it reads). The eager "
          "path also leaves the S buffers at the state before the last update (the next step's vjp computes the "
          "state after it anyway, and writes it in place) and keeps one copy of the gradient, plus a copy of x "
          "where its vjp reads it (L2 decay, a rule that reads x, a learned lr; decoupled or proximal decay with a "
          "fixed lr adds x to the update, with no learned coefficient on it, and the update reads it from the "
          "parameters): S+1(+1).")
        w("")
        w(f"*measured*: a fresh optimizer per candidate over its first {mem['steps']} steps ({mem['method']}): "
          "*kept* is the allocator's level after the steps minus before, *reachable* the distinct tensor storages "
          "reachable from the optimizer object (state, buckets, records, spare buffers; parameters and gradients "
          "excluded), *peak* the highest level above the model during the steps, *step transient* the peak of the "
          "last (steady) step above its starting level, *alloc/step* the bytes the last step allocated (every "
          "allocated temporary is written and read at least once). *peak / analytic* compares the measured peak "
          f"with the buffer count's prediction (target <= {TARGET_PEAK}).")
        w("")
        _memory_rows(w, mem)
        w("Count per rule (analytic, parameter-sized buffers):")
        w("")
        w("| rule | S (rule alone) | hyper-learning, fused path (S+2-a) | hyper-learning, eager path |")
        w("|---|---:|---:|---:|")
        for rule in ["mada"] + list(RULE_KWARGS):
            fam = family(rule)
            S = len(tensor_states(fam))
            eager, _ = eager_hyper_buffers(fam, WEIGHT_DECAY, fam.weight_decay_mode)
            fused = (f"{S + 2 - fused_rotation(fam)}" if not any(s.scalar for s in fam.states) and not fam.uses_param
                     else "n/a")
            w(f"| {rule} | {S} | {fused} | {eager} (with weight decay) |")
        w("")

    # (d) train
    if report.get("train"):
        w("## (d) Whole train step")
        w("")
        w("zero_grad, forward, backward and optimizer step of a GPT, each candidate on its own copy of the "
          "same initial model, the same random-token batch per round (the cost does not depend on the data), "
          "round-robin, median over the timed rounds. No gradient clipping. *projected x*: the ratio at a larger "
          "batch, forward+backward scaled linearly from the measured pooled median, optimizer steps as measured "
          "(an estimate, not a measurement). *tokens/s*: batch x block over the median train step. *state MB*: "
          "the optimizer's own tensors (state, records, gradient buffers). On CUDA, *step peak MB*: the highest "
          "allocation during the candidate's last train step above what was resident before it.")
        w("")
        if not any(tab.get("model") == "gpt2_124m" for tab in report["train"].values()):
            w("No CUDA device in this run: the GPT-2 124M rows (forward in bf16 autocast, fused AdamW baseline, "
              "tokens/s and peak memory) are measured only when `--all` runs on a GPU (`--device cuda`, "
              "`--gpt2-batch`, `--gpt2-steps`; `experiments/gpu_check.sh`); the same script runs there unchanged."
              + (" Such a run's rows are in *GPU rows* at the end of this page." if gpu else ""))
            w("")
        for label, tab in report["train"].items():
            _train_rows(w, label, tab, report["config"]["device"])

    # (e) scaling
    sc = report.get("scaling")
    if sc:
        w("## (e) Step time against parameter count")
        w("")
        w(f"Square 3-layer GELU MLPs (in = hidden = width, 10 outputs), two alternating fixed gradients, "
          "candidates interleaved, "
          f"median of {sc['steps']} rounds per size. *ms/M*: milliseconds per million parameters; linear scaling "
          "means a flat ms/M column (above a fixed per-step overhead at small sizes).")
        w("")
        names = list(sc["rows"][0]["results"])
        w("| params | width | " + " | ".join(f"{n} ms | {n} ms/M" for n in names) + " | " +
          " | ".join(f"{n} x fused" for n in names if n != FUSED) + " |")
        w("|---:|---:|" + "---:|---:|" * len(names) + "---:|" * len([n for n in names if n != FUSED]))
        for row in sc["rows"]:
            res = row["results"]
            w(f"| {row['n_params'] / 1e6:.2f}M | {row['width']} | "
              + " | ".join(f"{res[n]['median_ms']:.1f} | {res[n]['ms_per_m']:.2f}" for n in names) + " | "
              + " | ".join(f"{res[n]['ratio_to_fused']:.2f}" for n in names if n != FUSED) + " |")
        w("")
        w("Least-squares fit `ms = a + b * (params in M)`:")
        w("")
        w("| optimizer | a (ms) | b (ms per M params) | R^2 | largest relative residual |")
        w("|---|---:|---:|---:|---:|")
        for n, fit in sc["fits"].items():
            w(f"| {n} | {_f(fit['intercept_ms'])} | {_f(fit['slope_ms_per_m'], '{:.3f}')} | {_f(fit['r2'], '{:.4f}')} "
              f"| {_f(fit['max_rel_residual'], '{:.1%}')} |")
        w("")

    # (f) tower
    tw = report.get("tower")
    if tw:
        w("## (f) Tower depth")
        w("")
        w("MADA learning its six coefficients with a tower of depth 1, 2 and 3, interleaved with fused AdamW. "
          "*extra*: median over rounds of the paired ratio to the tower one level shorter, minus 1 (quartiles in "
          "brackets); *extra ms*: median of the paired differences. A level updates a vector of a few coefficients, "
          "by the same code on the eager and the fused path, so its cost does not grow with the model: the second "
          "table measures it on a tiny model, where it is resolvable, and the estimate relates it to the large "
          "model's step.")
        w("")
        fmt = (lambda e: f"{e['median'] - 1:+.1%} ({e['p25'] - 1:+.1%} to {e['p75'] - 1:+.1%})" if e else "-")
        for tab in (tw, report.get("tower_small")):
            if not tab:
                continue
            w(f"### {tab['model']} ({tab['n_params'] / 1e6:.3g}M parameters), {'fused' if tab['fused'] else 'eager'} "
              f"path, {tab['steps']} timed rounds, fused AdamW {tab['fused_adamw_ms']:.2f} ms")
            w("")
            w("| depth | tower | median ms | x fused AdamW | extra vs one level less | extra ms | extra vs depth 1 |")
            w("|---|---|---:|---:|---|---:|---|")
            for d, r in tab["results"].items():
                tower = " <- ".join(r["tower"])
                w(f"| {d[5:]} | `{tower}` | {r['median_ms']:.2f} | {r['ratio_to_fused']:.2f} "
                  f"| {fmt(r.get('extra_vs_previous'))} | {_f(r.get('extra_ms_vs_previous'), '{:+.3f}')} "
                  f"| {fmt(r.get('extra_vs_depth1'))} |")
            w("")
        est = tower_level_estimate(report)
        if est:
            small = report["tower_small"]
            w(f"Estimate: extra ms per level on {small['model']} / depth-1 median step on {tw['model']} "
              f"({tw['results']['depth1']['median_ms']:.1f} ms): "
              + ", ".join(f"{d} {e:+.3%}" for d, e in est.items()) + ".")
            w("")

    kt = report.get("kernels")
    if kt:
        w("## (g) The two kernels of the hyper-learning step")
        w("")
        w(f"Each kernel alone on one flat float32 tensor of {kt['numel'] / 1e6:.1f}M elements (no Python loop over "
          f"tensors, no packing), interleaved with fused AdamW on a tensor of the same size, {kt['steps']} timed "
          f"rounds. *vjp*: the partial hypergradient of the recorded update (S + 2 = {kt['states'] + 2} buffers read)"
          + ("; on this CPU the library's hand-written MADA kernel (hypergrad.native), and *vjp_compiled* the "
             "compiled torch.func vjp that it replaces; " if "vjp_compiled" in kt["results"] else "; ")
          + f"*update*: advance past the recorded update, apply and record this one "
          f"({kt['results']['update']['floor_bytes']:g}: the new record goes to g_prev's buffer, the library's "
          f"rotation)"
          + ("; hand-written too, and *update_compiled* the compiled kernel it replaces; "
             if "update_compiled" in kt["results"] else "; ")
          + f"*rule*: the fixed-coefficient MADA update ({2 * kt['states'] + 3})."
          + (f" *one_pass* (a what-if, not in the library): the vjp and the next update in one loop, as a scheme that "
             f"applied each hypergradient one step late could run them (the update would not wait for this step's "
             f"reduction); it writes the advanced state to S other buffers, since Inductor fuses a reduction into an "
             f"update's loop only when the update does not overwrite what the reduction reads "
             f"({2 * kt['states'] + 5}, the update's traffic)." if "one_pass" in kt["results"] else "")
          + " *efficiency* = floor x / measured x: "
          "near 1 the kernel moves its bytes as fast as fused AdamW moves its own; well below 1 it is bound by "
          "its arithmetic, or its loop reads more streams than this machine serves at fused AdamW's rate. "
          "*vjp_io*, *update_io*, *rule_io*: kernels compiled the same way with the same reads, writes and "
          f"reductions ({kt.get('reductions', '?')}: one per learned coefficient) and next to no arithmetic, "
          "the cost of the memory traffic alone on this machine."
          + (" *c_adamw*, *c_vjp_io*, *c_rule_io*, *c_hyper_io*: plain C loops (experiments.traffic, -O3 "
             "-march=native, OpenMP at torch's thread count): AdamW's own update, checked against torch.optim.AdamW, "
             "and the traffic of vjp_io and rule_io with the fewest instructions a compiler makes of it; "
             "*c_hyper_io* runs the two back to back, the least traffic of any exact hyper step (2S + 4 read, "
             "S + 1 written)." if "c_hyper_io" in kt["results"] else "") + (
              f" *in-cache ns/el*: the same kernel on tensors of {kt['in_cache_sizes'][0]} and "
              f"{kt['in_cache_sizes'][1]} elements (every buffer in a core's L2 cache), {kt['in_cache_calls']} "
              f"calls back to back per reading, {kt.get('in_cache_rounds', kt['steps'])} interleaved rounds; the "
              "median difference between the two sizes per element is its cost without memory traffic or per-call "
              "overhead, its arithmetic. *arith x*: that cost over fused AdamW's whole "
              "step per element (large tensor): a floor set by the arithmetic, as *floor x* is one set by the "
              "bytes. (Not for *rule*: called through the optimizer-facing API, ~100 us of Python per call, it "
              "varies more than the difference to measure.)" if kt.get("in_cache_sizes") else ""))
        w("")
        cache = bool(kt.get("in_cache_sizes"))
        w("| kernel | median ms | x fused AdamW | paired x (p25-p75) | floor B/p | floor x | efficiency | GB/s |"
          + (" in-cache ns/el | arith x |" if cache else ""))
        w("|---|---:|---:|---|---:|---:|---:|---:|" + ("---:|---:|" if cache else ""))
        for n, r in kt["results"].items():
            pr = r["paired_ratio_to_fused"]
            w(f"| {n} | {r['median_ms']:.1f} | {r['ratio_to_fused']:.2f} | {pr['median']:.2f} ({pr['p25']:.2f}-"
              f"{pr['p75']:.2f}) | {r['floor_bytes']} | {r['floor_ratio']:.2f} | {r['floor_efficiency']:.2f} "
              f"| {r['achieved_gb_s']:.1f} |"
              + (f" {_f(r.get('in_cache_ns'))} | {_f(r.get('arith_ratio'))} |" if cache else ""))
        w("")
        res = kt["results"]
        if cache:
            arith = res["vjp"]["arith_ratio"] + res["update"]["arith_ratio"]
            w(f"Their arithmetic alone (in cache, vjp + update) costs {arith:.2f}x fused AdamW's step: "
              + (f"above the {TARGET_HYPER}x target by itself, even if no byte had to come from memory and no call "
                 "cost anything." if arith > TARGET_HYPER else
                 f"within the {TARGET_HYPER}x target; traffic and per-call costs come on top.")
              + _vjp_bound(res))
            w("")
        vj, up = res["vjp"], res["update"]
        w(f"The two kernels of a step together: {vj['ratio_to_fused'] + up['ratio_to_fused']:.2f}x fused AdamW "
          f"against a floor of {vj['floor_ratio'] + up['floor_ratio']:.2f}x; the vjp kernel runs at "
          f"{vj['floor_efficiency']:.2f} of its bandwidth floor and the update at {up['floor_efficiency']:.2f}.")
        if "vjp_io" in res:
            io = res["vjp_io"]["ratio_to_fused"] + res["update_io"]["ratio_to_fused"]
            real = vj["ratio_to_fused"] + up["ratio_to_fused"]
            rule_io, rule = res["rule_io"]["ratio_to_fused"], res["rule"]["ratio_to_fused"]
            w("")
            w(f"Their memory traffic alone (vjp_io + update_io) costs {io:.2f}x fused AdamW here, and the real "
              f"kernels {real / io:.2f}x that. " + (
                  f"This exact hyper-learning step reads the recorded buffers once to reduce the hypergradient and "
                  f"again to apply the updated coefficients: on this machine that traffic alone is above the "
                  f"{TARGET_HYPER}x target, whatever the arithmetic." if io > TARGET_HYPER else
                  f"The traffic alone is within the {TARGET_HYPER}x target: the arithmetic is what stands above it."))
            if rule_io > TARGET_RULE:
                why = f"; the traffic alone is above the {TARGET_RULE}x target."
            elif rule > TARGET_RULE:
                why = (f": the traffic is within the {TARGET_RULE}x target, the arithmetic (per element a square "
                       "root, a division, two signs) is what stands above it.")
            else:
                why = f": both within the {TARGET_RULE}x target."
            w(f"The fixed rule's traffic alone (rule_io) costs {rule_io:.2f}x and the rule kernel {rule / rule_io:.2f}x "
              f"that{why}")
        S = kt["states"]
        fastest = max(r["achieved_gb_s"] for r in res.values())
        adamw_ms = res[FUSED]["median_ms"]
        least = 3 * S + 4
        least_x = least * kt["numel"] * 4 / (fastest * 1e9) * 1e3 / adamw_ms
        w("")
        w(f"A bound for any exact scheme, not only this one: the update must wait for the hypergradient, a reduction "
          f"over every parameter, and the {S} state buffers of a model this size are far larger than the caches near "
          f"a core, so they are fetched from memory in both passes. The new gradient is read twice, the state before "
          f"the last update and its gradient (S + 1 buffers) at least once for the reduction, and the update moves "
          f"its own 2S + 3: {least} parameter-sized buffers per step (*floor B/p* {least}) against this scheme's "
          f"{res['vjp']['floor_bytes'] + res['update']['floor_bytes']:g} (which reads the recorded state again to "
          f"advance it in place, and writes a gradient record). "
          f"Moved at the fastest rate any kernel of this table reached ({fastest:.1f} GB/s), {least} B/p take "
          f"{least_x:.2f}x fused AdamW's step"
          + (f": above the {TARGET_HYPER}x target before any arithmetic or per-call overhead."
             if least_x > TARGET_HYPER else
             f": within the {TARGET_HYPER}x target only for a scheme with that least traffic, every kernel at that "
             f"rate, and nothing else (no arithmetic cost, no per-call overhead)."))
        reads = _reads_paragraph(res, S)
        if reads:
            w("")
            w(reads)
        c_floor = _c_floor_paragraph(res, S)
        if c_floor:
            w("")
            w(c_floor)
        w("")
        one = res.get("one_pass")
        if one is not None:
            arith = (f"; its arithmetic alone (in cache) is {one['arith_ratio']:.2f}x"
                     if one.get("arith_ratio") is not None else "")
            above = one["ratio_to_fused"] > TARGET_HYPER
            w(("Nor does a scheme that is not exact get there on this machine. " if above else
               "A scheme that is not exact would get there for the kernel alone. ")
              + f"Applying each hypergradient one step late would let one loop do the vjp and the next update "
              f"(*one_pass*): its traffic is the update kernel's ({one['floor_ratio']:.2f}x floor), and it costs "
              f"{one['ratio_to_fused']:.2f}x fused AdamW" + arith
              + (f": {'above' if above else 'within'} the {TARGET_HYPER}x target for the kernel alone, with the "
                 f"per-element arithmetic of the vjp and of the update in the same loop, and S more buffers of "
                 f"memory for the state it writes out of place. The library keeps the exact scheme.")
              + (f" (*one_pass* is compiled from the DSL, as *vjp_compiled* and *update_compiled* are; written by "
                 f"hand, its arithmetic would still be about the native vjp's and update's together, "
                 f"{res['vjp']['arith_ratio'] + res['update']['arith_ratio']:.2f}x in cache.)"
                 if "vjp_compiled" in res and res["vjp"].get("arith_ratio") is not None
                 and res["update"].get("arith_ratio") is not None else ""))
            w("")

    it = report.get("interval")
    if it:
        w("## (h) Hyper-learning every k steps")
        w("")
        w(f"`HyperOptimizer(..., fused=True, hyper_interval=k)` on {it['model']} ({it['n_params'] / 1e6:.3g}M "
          f"parameters), MADA learning its six coefficients every k steps, interleaved with fused AdamW "
          f"({it['fused_adamw_ms']:.2f} ms) and the fixed-coefficient rule (mada_fused, "
          f"{it['mada_fused_ratio']:.2f}x), "
          f"{it['steps']} timed rounds. Only the update before a hyper-step is recorded; the next step learns from "
          f"it exactly as with k = 1 (the one-step hypergradient of that update), and the steps in between run the "
          f"plain rule. A cycle of k steps holds one *recording* step (the update reads the state and writes only "
          f"the parameters and the gradient record), one *learning* step (the vjp kernel, then an update that "
          f"advances the state past the recorded one) and k - 2 *plain* ones. *amortized x*: per cycle of k "
          f"consecutive steps, their total time over fused AdamW's in the same rounds, the median over the cycles "
          f"(*cycles*); *mean x*: the same over all of them at once. A plain step costs more than the rule "
          f"alone: with `nonfinite=\"skip\"` it first sums every gradient (one more read of them; a learning step "
          f"gets these sums from its vjp kernel), and the hyper-optimizer's step has more bookkeeping. The "
          f"coefficients move once per k steps: this trades how often they learn for cost, it is not the "
          f"every-step algorithm of the target.")
        w("")
        w("| k | amortized x fused AdamW | mean x | cycles | recording step x | learning step x | plain step x |")
        w("|---:|---:|---:|---:|---:|---:|---:|")
        for r in it["results"].values():
            kr = r["kind_ratios"]
            every = r["interval"] == 1
            rec, learn = (kr.get("every"),) * 2 if every else (kr.get("recording"), kr.get("learning"))
            w(f"| {r['interval']} | {r['amortized_ratio']:.2f} | {r['mean_ratio']:.2f} | {r['cycles']} | {_f(rec)} "
              f"| {_f(learn)} | {_f(kr.get('plain'))} |")
        w("")

    if gpu:
        _gpu_section(w, gpu, gpu_diag, report.get("git_commit"), gpu_note)

    w("## Phases")
    w("")
    w("| phase | seconds | load before | load after |")
    w("|---|---:|---|---|")
    for k, v in report["phases"].items():
        w(f"| {k} | {v['seconds']:.0f} | {v['loadavg_before']} | {v['loadavg_after']} |")
    w("")
    text = "\n".join(L)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


# ------------------------------------------------------------------------------------------ CLI
def _floats(s: str) -> List[float]:
    return [float(x) for x in s.split(",") if x]


def _ints(s: str) -> List[int]:
    values = [int(x) for x in s.split(",") if x]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"intervals must be integers >= 1, got {s!r}")
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODEL_CHOICES, default="gpt10m")
    p.add_argument("--steps", type=int, default=None,
                   help="timed rounds (median over these); default 20 (--all: 15 for the fast group)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first; default 2")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated candidates (the torch AdamW baselines always run): "
                        + ",".join(CANDIDATES))
    p.add_argument("--slow-steps", type=int, default=3,
                   help="timed rounds of the eager candidates, timed in a group of their own; default 3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=torch.device, default=None, help="cpu, cuda, cuda:1...; default cuda if available")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report path; default {DEFAULT_OUT}")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    a = p.add_argument_group("--all: the whole performance report of issue #5")
    a.add_argument("--all", action="store_true", help="run (a)-(f) and write one report (see module docstring)")
    a.add_argument("--doc", type=Path, default=None, help="with --all: also write the markdown page here")
    a.add_argument("--gpu-report", type=Path, default=None,
                   help="with --doc: the page's GPU rows from this --all report measured on CUDA "
                        "(experiments/gpu_check.sh writes one)")
    a.add_argument("--gpu-diag", type=Path, default=None,
                   help="with --doc: also the table of experiments/gpu_diag.py's JSON")
    a.add_argument("--gpu-note", default=None,
                   help="with --gpu-report: a note printed with the GPU rows (e.g. what changed since they ran)")
    a.add_argument("--render", type=Path, default=None, metavar="REPORT",
                   help="measure nothing: write --doc from this --all report (and --gpu-report, --gpu-diag)")
    a.add_argument("--models", default="gpt10m,mlp10m", help="models of the step table; default gpt10m,mlp10m")
    a.add_argument("--memory-model", default="gpt10m", help="model of the memory table ('' to skip)")
    a.add_argument("--train-steps", type=int, default=5, help="timed rounds of the Shakespeare-config train step; "
                                                                   "default 5")
    a.add_argument("--demo-train-steps", type=int, default=20, help="timed rounds of the demo train step; default 20")
    a.add_argument("--shakespeare-batch", type=int, default=4,
                   help="batch of the nanoGPT Shakespeare-config train step (nanoGPT uses 64: too slow on a CPU); "
                        "the ratio is also projected to 64. Default 4")
    a.add_argument("--no-train", action="store_true", help="skip the train-step tables")
    a.add_argument("--gpt2-batch", type=int, default=8,
                   help="on CUDA: batch of the GPT-2 124M train step in bf16 autocast (block 1024); default 8")
    a.add_argument("--gpt2-steps", type=int, default=10, help="on CUDA: timed rounds of the GPT-2 124M train step"),
    a.add_argument("--scaling-sizes", type=_floats, default=[1, 5, 10, 25, 50],
                   help="MLP sizes in M parameters; default 1,5,10,25,50 ('' to skip)")
    a.add_argument("--scaling-steps", type=int, default=6, help="timed rounds per scaling size; default 6")
    a.add_argument("--tower-model", default="gpt10m", help="model of the tower table ('' to skip)")
    a.add_argument("--tower-steps", type=int, default=30, help="timed rounds of the tower table; default 30")
    a.add_argument("--tower-small-model", default="tiny",
                   help="model of the small tower table (eager path; resolves a level's cost) ('' to skip)")
    a.add_argument("--tower-small-steps", type=int, default=60, help="timed rounds of the small tower table")
    a.add_argument("--kernel-numel", type=float, default=10.5e6,
                   help="elements of the flat tensor of the kernel table (g); default 10.5e6 (0 to skip)")
    a.add_argument("--kernel-steps", type=int, default=15, help="timed rounds of the kernel table; default 15")
    a.add_argument("--interval-model", default="gpt10m",
                   help="model of table (h), hyper-learning every k steps ('' to skip)")
    a.add_argument("--intervals", type=_ints, default=list(INTERVALS),
                   help=f"the k of table (h); default {','.join(map(str, INTERVALS))}")
    a.add_argument("--interval-steps", type=int, default=32,
                   help="timed rounds of table (h), a multiple of every k; default 32")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    gpu = json.loads(args.gpu_report.read_text()) if args.gpu_report else None
    gpu_diag = json.loads(args.gpu_diag.read_text()) if args.gpu_diag else None
    if (gpu or gpu_diag or args.gpu_note) and not args.doc:
        raise SystemExit("--gpu-report, --gpu-diag and --gpu-note go with --doc (they add to the page)")
    if args.gpu_note and not gpu:
        raise SystemExit("--gpu-note is a note on the GPU rows: give --gpu-report too")
    if args.render:
        if not args.doc:
            raise SystemExit("--render writes the page: give --doc PATH")
        report = json.loads(args.render.read_text())
        if report.get("kind") != "all":
            raise SystemExit(f"--render needs an --all report; {args.render} is not one")
        command = list(sys.argv[1:] if argv is None else argv)
        if args.gpu_note:  # the note is on the page already: its text once is enough
            command = ["'(the note below)'" if a == args.gpu_note else a for a in command]
            command = [a.split("=", 1)[0] + "='(the note below)'" if a.startswith("--gpu-note=") else a
                       for a in command]
        write_doc(report, args.doc, gpu, gpu_diag, args.gpu_note, rendered_by=command)
        print(f"wrote {args.doc} from {args.render}")
        return report
    if args.all:
        argv_list = list(sys.argv[1:] if argv is None else argv)
        on_cuda = (torch.device(args.device) if args.device else default_device()).type == "cuda"
        train_rows = () if args.no_train else (
            ("demo", "demo", 16, None, args.demo_train_steps),
            ("shakespeare", "gpt10m", args.shakespeare_batch, 64, args.train_steps))
        if on_cuda and not args.no_train:  # GPT-2 124M shapes, forward in bf16 autocast: the GPU rows, first
            train_rows = (("gpt2_124m_bf16", "gpt2_124m", args.gpt2_batch, None, args.gpt2_steps, torch.bfloat16),
                          *train_rows)
        report = run_all(models=[m for m in args.models.split(",") if m], only=args.only,
                         steps=args.steps if args.steps is not None else 15, warmup=args.warmup,
                         slow_steps=args.slow_steps, memory_model=args.memory_model or None,
                         train=train_rows,
                         scaling_sizes=args.scaling_sizes, scaling_steps=args.scaling_steps,
                         tower_model=args.tower_model or None, tower_steps=args.tower_steps,
                         tower_small_model=args.tower_small_model or None, tower_small_steps=args.tower_small_steps,
                         kernel_numel=int(args.kernel_numel), kernel_steps=args.kernel_steps,
                         interval_model=args.interval_model or None, intervals=args.intervals,
                         interval_steps=args.interval_steps, device=args.device, seed=args.seed,
                         progress=not args.no_progress, partial_out=args.out)
        report["argv"] = argv_list
        report["out"] = os.path.relpath(args.out, REPO_ROOT) if args.out.is_absolute() else str(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"--all done in {report['seconds']:.0f} s\n")
        for v in report["verdicts"]:
            verdict = "report" if v["met"] is None else ("met" if v["met"] else "NOT MET")
            print(f"[{verdict}] {v['target']}: {v['measured']}" + (f" ({v['note']})" if v["note"] else ""))
        if args.doc:
            write_doc(report, args.doc, gpu, gpu_diag, args.gpu_note)
            print(f"\nwrote {args.doc}")
        print(f"wrote {args.out}")
        return report
    report = run(args.model, steps=args.steps if args.steps is not None else 20, warmup=args.warmup, only=args.only,
                 seed=args.seed, progress=not args.no_progress, device=args.device, slow_steps=args.slow_steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    cfg = report["config"]
    print(f"Optimizer step only: {cfg['model']} ({cfg['n_params'] / 1e6:.2f}M params), torch {report['torch']}, "
          f"{cfg['threads']} threads, median of {cfg['steps']} interleaved steps (eager candidates: "
          f"{cfg['slow_steps']}, in a group of their own; ratios to that group's baselines)\n")
    print(markdown_table(report["results"]))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
