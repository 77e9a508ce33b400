"""Where the fused steps spend their time on a GPU: the step of fused AdamW, fixed MADA and
hyper-learning MADA on GPT-2 124M shapes, timed and profiled for each way of compiling our kernels.

    python3 -m experiments.gpu_diag --out runs/gpu_diag        # on a lent GPU machine

Variants (``--variants``): ``dynamic`` (the default route on a GPU: ``torch.compile(dynamic=True)``),
``static`` (Dynamo with static shapes: one compilation per tensor size, so Inductor sizes every
reduction's split for the tensor it runs on) and ``direct`` (``TensorKernel``'s direct Inductor
route, the CPU's default, forced on the GPU). Each variant builds fresh optimizers (fresh kernels),
times ``--steps`` steps after ``--warmup``, and profiles two more; the top kernels by device time
are printed and written to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import hypergrad
import optimizers
import optimizers.compiled as compiled
from experiments.bench_step import FUSED, GradientSets, LR, WEIGHT_DECAY, git_commit, make_model, param_groups

CANDIDATES = {
    FUSED: lambda groups: torch.optim.AdamW(groups, lr=LR, fused=True),
    "mada_fused": lambda groups: optimizers.RuleOptimizer(groups, optimizers.get_rule("mada"), lr=LR, fused=True),
    "mada_hyper_fused": lambda groups: hypergrad.HyperOptimizer(groups, "mada", lr=LR, fused=True,
                                                                nonfinite="ignore"),
}


def variant(name: str):
    """Patch how ``optimizers.compiled`` compiles (this process only; a diagnostic script)."""
    init = compiled.TensorKernel.__init__
    real_compile = torch.compile
    if name == "direct":
        def patched(self, fn, kname, route="auto"):
            init(self, fn, kname, "inductor")
        compiled.TensorKernel.__init__ = patched
    limits = {k: getattr(torch._dynamo.config, k) for k in ("cache_size_limit", "recompile_limit")
              if hasattr(torch._dynamo.config, k)}
    if name == "static":
        for k in limits:  # one compilation per tensor size: more than Dynamo's default limit of 8
            setattr(torch._dynamo.config, k, 64)

        def static(fn, dynamic=None, fullgraph=False, **kw):
            return real_compile(fn, dynamic=False, fullgraph=fullgraph, **kw)
        compiled.torch.compile = static  # the module object is torch itself: undone below

    def undo():
        compiled.TensorKernel.__init__ = init
        torch.compile = real_compile
        for k, v in limits.items():
            setattr(torch._dynamo.config, k, v)
    return undo


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt2_124m")
    p.add_argument("--variants", default="dynamic,static,direct")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("runs/gpu_diag"))
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check the script itself")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()
    torch.manual_seed(0)
    model = make_model(args.model, device=dev)
    grads = GradientSets(model, 0)
    report = {"git_commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if cuda else None, "model": args.model, "variants": {}}
    for v in args.variants.split(","):
        undo = variant(v)
        res = report["variants"][v] = {}
        try:
            for name, make in CANDIDATES.items():
                if name == FUSED and v != "dynamic":
                    continue
                t0 = time.perf_counter()
                try:
                    opt = make(param_groups(model, WEIGHT_DECAY))
                    for r in range(args.warmup):
                        grads(r)
                        opt.step()
                    sync()
                    warm_s = time.perf_counter() - t0
                    times = []
                    for r in range(args.steps):
                        grads(r)
                        sync()
                        a = time.perf_counter()
                        opt.step()
                        sync()
                        times.append((time.perf_counter() - a) * 1e3)
                    from torch.profiler import ProfilerActivity, profile
                    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                        for r in range(2):
                            grads(r)
                            opt.step()
                        sync()
                    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=14,
                                                      max_name_column_width=70)
                    (args.out / f"profile_{v}_{name}.txt").write_text(table)
                    key = "self_device_time_total" if cuda else "self_cpu_time_total"
                    kernels = [e for e in prof.key_averages() if getattr(e, key) > 0]
                    kernels.sort(key=lambda e: -getattr(e, key))
                    res[name] = {"median_ms": statistics.median(times), "min_ms": min(times), "warmup_s": warm_s,
                                 "top_kernels": [(e.key[:90], e.count, round(getattr(e, key) / 2e3, 3))
                                                 for e in kernels[:8]],
                                 "device_ms_per_step": sum(getattr(e, key) for e in kernels) / 2e3}
                    print(f"[{v}] {name}: median {res[name]['median_ms']:.2f} ms (device {res[name]['device_ms_per_step']:.2f} ms/step), "
                          f"warm-up {warm_s:.0f} s", flush=True)
                    for k in res[name]["top_kernels"]:
                        print(f"      {k[2]:8.3f} ms/step  x{k[1] // 2:<4d} {k[0]}", flush=True)
                    del opt
                except Exception as exc:  # a diagnostic: report and go on with the next variant
                    res[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                    print(f"[{v}] {name}: FAILED {res[name]['error'][:600]}", flush=True)
                (args.out / "diag.json").write_text(json.dumps(report, indent=2))
        finally:
            undo()
            torch._dynamo.reset()
    return report


if __name__ == "__main__":
    main()
