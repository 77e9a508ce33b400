"""Where the optimizer steps spend their time on a GPU: fused AdamW, fixed MADA and hyper-learning MADA
(fused, and eager with chosen chunk sizes) on GPT-2 124M shapes, timed, profiled and their peak
memory read, for each way of compiling and packing our kernels.

    python3 -m experiments.gpu_diag --out runs/gpu_diag                 # on a lent GPU machine
    python3 -m experiments.gpu_diag --variants default,pack=4194304 --eager-chunks none,16777216

Variants (``--variants``, comma-separated; each builds fresh optimizers, so fresh kernels):

* ``default``: the code as it is (``TensorKernel``'s "auto" route: Inductor's direct compilation for
  contiguous CPU and CUDA tensors; tensors below ``SMALL_TENSOR`` elements packed into runs);
* ``dynamo``: every kernel through ``torch.compile(dynamic=True)``, the GPU's route before the direct
  one (``direct`` and ``dynamic`` are the names an older JSON of this script gives these two);
* ``static``: ``torch.compile`` with static shapes, one compilation per tensor size;
* ``sized``: Inductor's direct route with static sizes (one compilation per argument layout): a
  reduction's split is then sized for the tensor it runs on, not for the first one compiled;
* ``pack=N``: the default route, packing tensors below N elements (fewer, longer kernel calls: does
  that pay on a GPU, where the hyper step is bound by its launches? An H100 run once measured the
  fused hyper step 23x slower with 2^22, but that came from Inductor's cache, not the packing:
  ``optimizers.compiled._LayoutKey``).

Each candidate runs ``--warmup`` steps, then ``--steps`` timed ones (median; device synchronised),
then two under torch.profiler, whose top kernels by device time are kept with the number of device
kernels a step launches, then two under cProfile, whose top Python functions by own time are kept
(the host's share of a step that launches hundreds of kernels); on CUDA also the allocator's peak
during the timed steps above what was allocated before them. Results go to
``--out``/diag.json after every candidate, and a profile table per candidate beside it.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.autograd import DeviceType

import hypergrad
import optimizers
import optimizers.adapter as adapter
import optimizers.compiled as compiled
from experiments.bench_step import FUSED, GradientSets, LR, WEIGHT_DECAY, git_commit, make_model, param_groups

CANDIDATES: Dict[str, Callable] = {
    FUSED: lambda groups: torch.optim.AdamW(groups, lr=LR, fused=True),
    "mada_fused": lambda groups: optimizers.RuleOptimizer(groups, optimizers.get_rule("mada"), lr=LR, fused=True),
    # native=False: the variants are ways of compiling the kernels, which MADA's hand-written CPU kernels
    # (hypergrad.native) would bypass on a CPU run of this script (on a GPU they are not used anyway)
    "mada_hyper_fused": lambda groups: hypergrad.HyperOptimizer(groups, "mada", lr=LR, fused=True,
                                                                nonfinite="ignore", native=False),
}

VARIANT_HELP = {
    "default": "the code as it is: Inductor's direct compilation for contiguous tensors, tensors below "
               f"{compiled.SMALL_TENSOR} elements packed",
    "dynamo": "every kernel through torch.compile(dynamic=True), the GPU's route before the direct one",
    "static": "torch.compile with static shapes (one compilation per tensor size)",
    "sized": "Inductor's direct route with static sizes (one compilation per argument layout)",
    "pack": "the default route, packing tensors below N elements",
}


def variant(name: str) -> Callable[[], None]:
    """Patch how ``optimizers`` compiles and packs (this process only: a diagnostic script); returns
    the function that undoes the patch."""
    init, plan_cls, real_compile = compiled.TensorKernel.__init__, adapter.SegmentPlan, torch.compile
    real_direct = compiled._compile_direct
    limits = {k: getattr(torch._dynamo.config, k) for k in ("cache_size_limit", "recompile_limit")
              if hasattr(torch._dynamo.config, k)}
    if name in ("dynamo", "static"):
        def routed(self, fn, kname, route="auto"):
            init(self, fn, kname, "dynamo")
        compiled.TensorKernel.__init__ = routed
    if name == "static":
        for k in limits:  # one compilation per tensor size: more than Dynamo's default limit of 8
            setattr(torch._dynamo.config, k, 64)

        def static(fn, dynamic=None, fullgraph=False, **kw):
            return real_compile(fn, dynamic=False, fullgraph=fullgraph, **kw)
        torch.compile = static
    elif name.startswith("pack="):
        small = int(name.split("=", 1)[1])

        def packed(params, groups=None, small_=small):
            return plan_cls(params, groups, small_)
        adapter.SegmentPlan = packed  # what a bucket builds its plans with
    elif name == "sized":
        def sized(graph, args, n_big):
            return real_direct(graph, args, 0)  # no dynamic argument: every size is baked in and guarded
        compiled._compile_direct = sized
    elif name not in ("default", "dynamo"):
        raise ValueError(f"variant {name!r}: allowed default, dynamo, static, sized, pack=N")

    def undo():
        compiled.TensorKernel.__init__, adapter.SegmentPlan, torch.compile = init, plan_cls, real_compile
        compiled._compile_direct = real_direct
        for k, v in limits.items():
            setattr(torch._dynamo.config, k, v)
    return undo


def host_profile(step: Callable[[int], None], steps: int = 2, top: int = 12) -> List[list]:
    """``step(r)`` run ``steps`` times under cProfile: the ``top`` functions by own time, as
    ``[function, calls per step, own ms per step, cumulative ms per step]``."""
    prof = cProfile.Profile()
    prof.enable()
    for r in range(steps):
        step(r)
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (primitive calls, calls, tottime, cumtime, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [[f"{Path(f).name}:{line}({name})"[:90], calls // steps, round(tt * 1e3 / steps, 3),
             round(ct * 1e3 / steps, 3)] for (f, line, name), (_, calls, tt, ct, _) in rows]


def _chunk(text: str) -> Optional[int]:
    return None if text == "none" else int(text)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2_124m")
    p.add_argument("--variants", default="default,dynamo,pack=1048576")
    p.add_argument("--eager-chunks", default="none,16777216",
                   help="chunk_numel of the eager hyper-learning candidates ('none': the device's default, one "
                        "chunk on a GPU); '' for none. They run in the first variant only (nothing of theirs "
                        "is compiled)")
    p.add_argument("--sources", default="",
                   help="comma-separated substrings of kernel names (e.g. 'hyper_partial'): the Inductor source of "
                        "each direct compilation of a matching kernel is written to --out as "
                        "source_<variant>_<kernel>_<n>.py (what split and block sizes its reductions got)")
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
    pbytes = sum(q.numel() * q.element_size() for q in model.parameters())
    variants = [v for v in args.variants.split(",") if v]
    report = {"git_commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "argv": list(sys.argv[1:] if argv is None else argv), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if cuda else None, "model": args.model,
              "variant_help": {v: VARIANT_HELP[v.split("=")[0]] + (f" (N = {v.split('=')[1]})" if "=" in v else "")
                               for v in variants},
              "variants": {}}
    def eager_hyper(chunk: Optional[int]):
        def make(groups):
            opt = hypergrad.HyperOptimizer(groups, "mada", lr=LR, nonfinite="ignore")
            opt.chunk_numel = chunk  # (an attribute: None is the device's default)
            return opt
        return make

    eager = {f"mada_hyper_chunk={c}": eager_hyper(_chunk(c)) for c in args.eager_chunks.split(",") if c}
    wanted = [w for w in args.sources.split(",") if w]
    real_bare = compiled._bare_call

    def recording(v):
        def bare_call(graph, compiled_fn, n_args):
            name = graph.__class__.__name__
            if any(w in name for w in wanted):
                code = getattr(compiled._inductor_graph(compiled_fn), "source_code", None) or ""
                stem = f"source_{v.replace('=', '')}_{name}"
                n = len(list(args.out.glob(f"{stem}_*.py")))
                (args.out / f"{stem}_{n}.py").write_text(code)
            return real_bare(graph, compiled_fn, n_args)
        return bare_call

    for k, v in enumerate(variants):
        undo = variant(v)
        if wanted:
            compiled._bare_call = recording(v)
        res = report["variants"][v] = {}
        try:
            for name, make in {**CANDIDATES, **(eager if k == 0 else {})}.items():
                if name == FUSED and k:
                    continue  # torch's own: the same in every variant
                t0 = time.perf_counter()
                try:
                    opt = make(param_groups(model, WEIGHT_DECAY))
                    for r in range(args.warmup):
                        grads(r)
                        opt.step()
                    sync()
                    warm_s = time.perf_counter() - t0
                    if cuda:
                        level = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    times = []
                    for r in range(args.steps):
                        grads(r)
                        sync()
                        a = time.perf_counter()
                        opt.step()
                        sync()
                        times.append((time.perf_counter() - a) * 1e3)
                    peak = (torch.cuda.max_memory_allocated() - level) / pbytes if cuda else None
                    from torch.profiler import ProfilerActivity, profile
                    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                        for r in range(2):
                            grads(r)
                            opt.step()
                        sync()
                    key = "self_device_time_total" if cuda else "self_cpu_time_total"
                    table = prof.key_averages().table(sort_by=key.replace("device", "cuda"), row_limit=14,
                                                      max_name_column_width=70)
                    (args.out / f"profile_{v.replace('=', '')}_{name.replace('=', '')}.txt").write_text(table)
                    kernels = sorted((e for e in prof.key_averages() if getattr(e, key) > 0),
                                     key=lambda e: -getattr(e, key))
                    launched = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA) // 2

                    def one_step(r):
                        grads(r)
                        opt.step()
                        sync()
                    host = host_profile(one_step)
                    res[name] = {"median_ms": statistics.median(times), "min_ms": min(times), "warmup_s": warm_s,
                                 "step_peak_buffers": peak,
                                 "top_kernels": [(e.key[:90], e.count, round(getattr(e, key) / 2e3, 3))
                                                 for e in kernels[:8]],
                                 "device_kernels_per_step": launched if cuda else None, "host_top": host}
                    print(f"[{v}] {name}: median {res[name]['median_ms']:.2f} ms, warm-up {warm_s:.0f} s"
                          + (f", step peak {peak:.2f} parameter-sized buffers" if cuda else ""), flush=True)
                    for kern in res[name]["top_kernels"]:
                        print(f"      {kern[2]:8.3f} ms/step  x{kern[1] // 2:<4d} {kern[0]}", flush=True)
                    print(f"      host (cProfile, own ms/step; {launched if cuda else '-'} device kernels/step):",
                          flush=True)
                    for fn, calls, own, cum in host[:8]:
                        print(f"      {own:8.3f} ms own {cum:8.3f} cum  x{calls:<5d} {fn}", flush=True)
                    del opt
                except Exception as exc:  # a diagnostic: report and go on with the next candidate
                    res[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                    print(f"[{v}] {name}: FAILED {res[name]['error'][:600]}", flush=True)
                (args.out / "diag.json").write_text(json.dumps(report, indent=2))
        finally:
            undo()
            compiled._bare_call = real_bare
            torch._dynamo.reset()
    return report


if __name__ == "__main__":
    main()
