"""Data parallelism on CPU (gloo, 2 processes on 127.0.0.1): distributed runs equal one process.

DDP: hypergrad.MADA under DistributedDataParallel, the global batch split across the ranks (and
with gradient accumulation over 2 micro-batches, ``no_sync`` on the first), follows the
single-process run on the whole global batch: the same learned coefficients and hypergradients at
every step and the same final parameters, to float round-off (1e-6 in float32, 1e-12 in float64),
and both ranks hold bit-identical coefficients at every step. This holds because DDP all-reduces
the gradients: every rank sees the full averaged gradient, so the hypergradient dot products
g_t . dDelta/dq need no communication of their own. The tolerances hold with a plain SGD
hyper-level; the default Adam hyper-level amplifies round-off (see ``TOL`` and ``_ADAM_TOWER_F32``).

FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters and gradients are DTensor shards, so
the optimizers' flat buffers and the hypergradient dot products would need DTensor support (and an
all-reduce of the per-shard dot products). ``torch.optim.AdamW`` under FSDP2 is checked against one
process to validate the harness; the toolkit's optimizers under FSDP2 are strict xfails.

Each rank writes its trajectory to ``tmp_path``; the parent compares. The workers live in this
module, so ``torch.multiprocessing`` (spawn) imports it by name in the children.
"""
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hypergrad as H
import optimizers as O

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
STEPS = 6
GLOBAL_BATCH = 16
TIMEOUT_S = 120
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_interface():
    try:
        for _, name in socket.if_nameindex():
            if name == "lo" or name.startswith("lo"):
                return name
    except OSError:
        pass
    return None


def _launch(fn, args):
    """Run ``fn(rank, *args)`` in WORLD spawned processes; fail (and kill them) after TIMEOUT_S."""
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)


def _init(rank, port):
    # Everything stays on the loopback interface.
    iface = _loopback_interface()
    if iface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = iface
    torch.set_num_threads(1)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


# ----------------------------------------------------------------------------- the problem
def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def global_batch(step, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def make_mada(params, tower="sgd"):
    """MADA learning its six coefficients. ``tower="sgd"``: plain hyper-gradient descent, which
    passes float round-off through unamplified; ``"adam"``: the default hyper-optimizer (see
    ``test_ddp_mada_default_tower_float32``). Hyper-learning rates large enough that the
    coefficients visibly move in STEPS steps."""
    level = H.Level("sgd", lr=0.3) if tower == "sgd" else H.Level("adam", lr=1e-2)
    return H.MADA(params, lr=1e-2, weight_decay=0.01, tower=level, beta3=0.3, c=0.6, rho=0.6, gamma=0.8)


def snapshot(opt):
    return ({k: v.clone() for k, v in opt.coefficients().items()},
            {k: v.clone() for k, v in opt.hypergradients().items()})


def reference_run(dtype, tower="sgd"):
    """One process, the whole global batch per step."""
    model = make_model(dtype)
    opt = make_mada(model.parameters(), tower)
    coefs, hgs = [], []
    for step in range(STEPS):
        x, y = global_batch(step, dtype)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        c, h = snapshot(opt)
        coefs.append(c)
        hgs.append(h)
    return {"coefficients": coefs, "hypergradients": hgs,
            "params": [p.detach().clone() for p in model.parameters()]}


# ----------------------------------------------------------------------------- DDP worker
DDP_CONFIGS = [(dtype, accumulate, "sgd") for dtype in ("float32", "float64") for accumulate in (1, 2)]
DDP_CONFIGS += [("float32", 2, "adam"), ("float64", 2, "adam")]


def _ddp_worker(rank, port, outdir):
    _init(rank, port)
    from torch.nn.parallel import DistributedDataParallel as DDP
    try:
        for dtype_name, accumulate, tower in DDP_CONFIGS:
            dtype = getattr(torch, dtype_name)
            model = DDP(make_model(dtype))
            opt = make_mada(model.parameters(), tower)
            coefs, hgs = [], []
            local = GLOBAL_BATCH // WORLD
            micro = local // accumulate
            for step in range(STEPS):
                x, y = global_batch(step, dtype)
                x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
                opt.zero_grad()
                for k in range(accumulate):
                    xb, yb = x[k * micro:(k + 1) * micro], y[k * micro:(k + 1) * micro]
                    if k < accumulate - 1:
                        with model.no_sync():  # accumulate locally, all-reduce with the last micro-batch
                            (nn.functional.mse_loss(model(xb), yb) / accumulate).backward()
                    else:
                        (nn.functional.mse_loss(model(xb), yb) / accumulate).backward()
                opt.step()
                c, h = snapshot(opt)
                coefs.append(c)
                hgs.append(h)
            torch.save({"coefficients": coefs, "hypergradients": hgs,
                        "params": [p.detach().clone() for p in model.module.parameters()]},
                       os.path.join(outdir, f"ddp_{dtype_name}_acc{accumulate}_{tower}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("ddp"))
    _launch(_ddp_worker, (_free_port(), outdir))
    return outdir


# float32: gradients of the split batch differ from the whole batch's by round-off (~1e-7 relative),
# carried through 6 steps; float64: the same at ~1e-16. With the Adam hyper-optimizer the t=1
# hypergradients of beta1/beta2, exactly 0 in exact arithmetic (the bias corrections cancel them),
# come out as round-off (~1e-17 in float64), which Adam normalizes by (|g| + 1e-8): an amplification
# of ~lr/1e-8 = 1e6, hence the looser float64 tolerance for that tower.
TOL = {("float32", "sgd"): dict(rtol=1e-5, atol=1e-6), ("float64", "sgd"): dict(rtol=1e-10, atol=1e-12),
       ("float64", "adam"): dict(rtol=1e-8, atol=1e-9), ("float32", "adam"): dict(rtol=1e-5, atol=1e-6)}

_ADAM_TOWER_F32 = (
    "with the default Adam hyper-optimizer, float32 DDP and single-process runs differ by ~lr_hyper (1e-2 "
    "here) in beta1/beta2 after the first hyper-step: the t=1 hypergradients of beta1 and beta2 are exactly "
    "0 in exact arithmetic (m/(1-beta1^1) = g, v/(1-beta2^1) = g^2) but come out as float32 round-off "
    "(+-1.5e-8, depending on how the batch was split), and Adam's first step lr*m/(sqrt(v)+1e-8) turns that "
    "noise into a step of ~lr/2 with a random sign")


def _ddp_case(dtype, accumulate, tower):
    marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=_ADAM_TOWER_F32)] \
        if (dtype, tower) == ("float32", "adam") else []
    return pytest.param(dtype, accumulate, tower, id=f"{dtype}-acc{accumulate}-{tower}", marks=marks)


@pytest.mark.parametrize("dtype_name, accumulate, tower", [_ddp_case(*c) for c in DDP_CONFIGS])
def test_ddp_mada_equals_single_process(ddp_results, dtype_name, accumulate, tower):
    dtype = getattr(torch, dtype_name)
    ranks = [torch.load(os.path.join(ddp_results, f"ddp_{dtype_name}_acc{accumulate}_{tower}_rank{r}.pt"),
                        weights_only=True) for r in range(WORLD)]
    ref = reference_run(dtype, tower)
    tol = TOL[dtype_name, tower]
    # the coefficients move (otherwise equality would be trivial)
    assert any(abs(ref["coefficients"][-1][k].item() - ref["coefficients"][0][k].item()) > 1e-3
               for k in ref["coefficients"][0])
    for step in range(STEPS):
        # identical on both ranks, bit for bit
        for r in range(1, WORLD):
            for key in ("coefficients", "hypergradients"):
                a, b = ranks[0][key][step], ranks[r][key][step]
                assert a.keys() == b.keys()
                assert all(torch.equal(a[k], b[k]) for k in a), (step, key, a, b)
        # equal to one process on the global batch
        for key in ("coefficients", "hypergradients"):
            got, want = ranks[0][key][step], ref[key][step]
            assert got.keys() == want.keys(), (step, key)
            for k in want:
                torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m: f"step {step} {key} {k}: {m}")
    assert len(ref["hypergradients"][-1]) == 6
    for r in range(WORLD):
        for p, q in zip(ranks[r]["params"], ref["params"]):
            torch.testing.assert_close(p, q, **tol)


# ----------------------------------------------------------------------------- FSDP2 worker
FSDP_CONFIGS = ("torch_adamw", "rule_adamw", "mada")


def _make_fsdp_optimizer(name, params):
    if name == "torch_adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    if name == "rule_adamw":
        return O.RuleOptimizer(params, "adamw", lr=1e-2, weight_decay=0.01)
    return make_mada(params)


def _fsdp_worker(rank, port, outdir):
    _init(rank, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor
        mesh = init_device_mesh("cpu", (WORLD,))
        for name in FSDP_CONFIGS:
            record = {"error": None, "coefficients": [], "hypergradients": [], "params": None}
            model = make_model(torch.float32)
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            record["param_types"] = [type(p).__name__ for p in model.parameters()]
            record["local_shapes"] = [tuple(p.to_local().shape) if isinstance(p, DTensor) else tuple(p.shape)
                                      for p in model.parameters()]
            local = GLOBAL_BATCH // WORLD
            try:
                opt = _make_fsdp_optimizer(name, model.parameters())
                for step in range(STEPS):
                    x, y = global_batch(step, torch.float32)
                    opt.zero_grad()
                    nn.functional.mse_loss(model(x[rank * local:(rank + 1) * local]),
                                           y[rank * local:(rank + 1) * local]).backward()
                    record["grad_types"] = [type(p.grad).__name__ for p in model.parameters()]
                    opt.step()
                    if isinstance(opt, H.HyperOptimizer):
                        c, h = snapshot(opt)
                        record["coefficients"].append(c)
                        record["hypergradients"].append(h)
                record["params"] = [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                                    for p in model.parameters()]
            except Exception as e:  # recorded for the parent; the same local failure happens on every rank
                tb = traceback.extract_tb(e.__traceback__)
                ours = [f for f in tb if f.filename.startswith((os.path.join(ROOT, "optimizers"),
                                                                os.path.join(ROOT, "hypergrad")))]
                where = f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno}" if ours else "?"
                record["error"] = f"{type(e).__name__} at {where}: {e}"
            torch.save(record, os.path.join(outdir, f"fsdp_{name}_rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available")
    outdir = str(tmp_path_factory.mktemp("fsdp"))
    _launch(_fsdp_worker, (_free_port(), outdir))
    return outdir


def _fsdp_records(outdir, name):
    records = [torch.load(os.path.join(outdir, f"fsdp_{name}_rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    for rec in records:
        if rec["error"] is not None:
            pytest.fail(f"FSDP2 + {name}: {rec['error']} (params: {rec['param_types']}, local shapes "
                        f"{rec['local_shapes']}, grads: {rec.get('grad_types')})")
    return records


def _reference_adamw():
    model = make_model(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for step in range(STEPS):
        x, y = global_batch(step, torch.float32)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_fsdp2_torch_adamw_equals_single_process(fsdp_results):
    """The harness: FSDP2 runs on CPU/gloo in this torch, and torch.optim.AdamW on the shards follows
    the single-process run; parameters and gradients are DTensor shards."""
    records = _fsdp_records(fsdp_results, "torch_adamw")
    assert records[0]["param_types"] == ["DTensor"] * 4 and records[0]["grad_types"] == ["DTensor"] * 4
    for rec in records:
        for p, q in zip(rec["params"], _reference_adamw()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


_FSDP_FLAT = ("the flat-buffer adapter does not support DTensor (FSDP2) parameters: optimizers/functional.py "
              "flatten() reshapes every gradient to 1-D, and reshape(-1) of the unevenly Shard(0)-sharded 3x16 "
              "output weight raises RuntimeError 'Cannot flatten unevenly sharded tensor: dimension 0 (size 3) "
              "is not evenly divisible by mesh dimension 0 (size 2)'; with evenly sharded parameters the step "
              "fails later, in Family.update, with 'aten.add.Tensor got mixed torch.Tensor and DTensor' (the "
              "flat buffers are plain tensors sized by p.numel(), the GLOBAL size, the gradients DTensors)")


@pytest.mark.xfail(strict=True, reason=_FSDP_FLAT)
def test_fsdp2_rule_optimizer_adamw_equals_single_process(fsdp_results):
    records = _fsdp_records(fsdp_results, "rule_adamw")
    for rec in records:
        for p, q in zip(rec["params"], _reference_adamw()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.xfail(strict=True, reason=_FSDP_FLAT + "; beyond that, each rank's hypergradient g_t . dDelta/dq "
                   "is a dot product over its own shard and needs an all-reduce (sum) across ranks to equal "
                   "the single-process hypergradient, without which the ranks' coefficients diverge")
def test_fsdp2_mada_equals_single_process(fsdp_results):
    records = _fsdp_records(fsdp_results, "mada")
    ref = reference_run(torch.float32)
    for rec in records:
        for step in range(STEPS):
            for key in ("coefficients", "hypergradients"):
                for k, want in ref[key][step].items():
                    torch.testing.assert_close(rec[key][step][k], want, rtol=1e-5, atol=1e-6)
        for p, q in zip(rec["params"], ref["params"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
