"""The GPU paths, skipped where torch sees no CUDA device (CI): on a GPU the same optimizers must give
the CPU's numbers and queue their steps without waiting for the device.

Oracles: the CPU run of the same optimizer in float64 (which the other modules check against
torch.func, torch.optim, ``higher`` and finite differences), and ``torch.optim`` on the same GPU.
On the GPU the fused kernels are Triton code (Inductor's direct compilation for contiguous tensors,
Dynamo's for strided ones: ``TensorKernel``'s two routes), not the CPU's C++ loops, so these tests
are what checks that code. They passed on an H100 at 2cb781e (``experiments/gpu_check.sh``), before
the last test and the CUDA size classes of ``optimizers.compiled`` (not run on a GPU yet).

Run them on a GPU machine with ``python -m pytest tests/test_cuda.py``. ``HYPERGRAD_TEST_DEVICE=cpu``
runs the comparisons with the CPU in the GPU's place (a check of the tests themselves, not of a GPU).
"""
import os

import pytest
import torch
from torch import nn

import hypergrad as H
import optimizers as O
from hypergrad.gradcheck import MADA_INTERIOR
from conftest import make_batch, make_model

DEVICE = os.environ.get("HYPERGRAD_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 6
# float64 on both devices; the GPU sums in another order (hypergradient reductions), so the two runs
# agree to rounding, not bit for bit
RTOL, ATOL = 1e-9, 1e-11


def _batches(device, dtype=torch.float64):
    return [tuple(t.to(device) for t in make_batch(dtype, seed=100 + k)) for k in range(STEPS)]


def _run(device, make_opt, dtype=torch.float64, strided=False):
    """``STEPS`` steps of ``make_opt(params)`` on the conftest model; the parameters and the optimizer.
    ``strided``: the first weight is a transposed (non-contiguous) tensor, which the fused path runs
    through Dynamo rather than its direct Inductor compilation."""
    model = make_model(dtype).to(device)
    if strided:
        model[0].weight = nn.Parameter(model[0].weight.detach().t().contiguous().t())
        assert not model[0].weight.is_contiguous()
    opt = make_opt(model.parameters())
    for x, y in _batches(device, dtype):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return [p.detach().cpu() for p in model.parameters()], opt


def _close(a, b, what):
    assert torch.allclose(a.cpu(), b.cpu(), rtol=RTOL, atol=ATOL), f"{what}: max |diff| {(a.cpu() - b.cpu()).abs().max()}"


TOWERS = {"one level": None, "tower of two": lambda: [H.Level("adam", lr=1e-3, learn=["lr"]), H.Level("sgd", lr=1e-4)]}


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("tower", list(TOWERS))
def test_hyper_learning_on_the_gpu_equals_the_cpu(fused, tower):
    """MADA learning all six coefficients (and, for the tower, Adam's lr learned by SGD): parameters,
    coefficients and hypergradients after the steps equal the CPU's (the tower on a strided weight:
    the Dynamo route of the fused kernels beside the direct one)."""
    def make(params):
        return H.HyperOptimizer(params, "mada", lr=1e-2, weight_decay=0.1, fused=fused, **MADA_INTERIOR,
                                tower=None if TOWERS[tower] is None else TOWERS[tower]())

    strided = TOWERS[tower] is not None
    cpu_params, cpu_opt = _run("cpu", make, strided=strided)
    gpu_params, gpu_opt = _run(DEVICE, make, strided=strided)
    for k, (a, b) in enumerate(zip(cpu_params, gpu_params)):
        _close(a, b, f"parameter {k}")
    for k, (a, b) in enumerate(zip(cpu_opt._q, gpu_opt._q)):
        _close(a, b, f"coefficients of level {k}")
    for name, a in cpu_opt.hypergradients().items():
        _close(a, gpu_opt.hypergradients()[name], f"hypergradient {name}")
    assert (cpu_opt._q[0][:6] - torch.tensor(list(MADA_INTERIOR.values()), dtype=torch.float64)).abs().max() > 1e-4


def _rule_kwargs(name):
    if name.startswith("sgd"):
        return {"momentum": 0.9}
    if name == "mada":
        return dict(beta3=0.3, c=0.4, rho=0.6, gamma=0.7)
    return {}


@pytest.mark.parametrize("name", list(O.RULES))
def test_every_rule_fused_on_the_gpu_equals_the_cpu(name):
    """Each vertex rule (and MADA) through the GPU's fused kernels equals the same rule's eager path
    on the CPU (test_parity checks that one against torch.optim and the papers' loops), state included."""
    def make(fused):
        return lambda params: O.RuleOptimizer(params, O.get_rule(name), lr=1e-2, weight_decay=0.1, fused=fused,
                                              **_rule_kwargs(name))

    cpu_params, cpu_opt = _run("cpu", make(False), strided=True)
    gpu_params, gpu_opt = _run(DEVICE, make(True), strided=True)
    for k, (a, b) in enumerate(zip(cpu_params, gpu_params)):
        _close(a, b, f"{name}: parameter {k}")
    for k, (sa, sb) in enumerate(zip(cpu_opt.state.values(), gpu_opt.state.values())):
        for key in sa:
            if key != "step":
                _close(torch.as_tensor(sa[key]), torch.as_tensor(sb[key]), f"{name}: state {key} of parameter {k}")


@pytest.mark.parametrize("rule,reference", [
    ("adamw", lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False)),
    ("adam", lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.1, foreach=False)),
    ("amsgrad", lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False)),
])
def test_fused_rules_on_the_gpu_equal_torch_optim_there(rule, reference):
    ours, _ = _run(DEVICE, lambda params: O.RuleOptimizer(params, O.get_rule(rule), lr=1e-2, weight_decay=0.1,
                                                          fused=True))
    theirs, _ = _run(DEVICE, reference)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        _close(a, b, f"{rule}: parameter {k}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("hyper", [False, True], ids=["mada", "mada_hyper"])
def test_fused_steps_on_the_gpu_do_not_synchronise_with_the_host(hyper):
    """Issue 5: no host synchronisation in the step. CUDA's sync debug mode turns every synchronising
    call (a read back to the host, a blocking copy from pageable memory, a stream synchronisation) into
    an error. The hyper step with ``nonfinite="ignore"`` (the default policy reads one flag per step,
    on purpose); the fixed-coefficient rule with its defaults."""
    model = make_model(torch.float32).to("cuda")
    if hyper:
        opt = H.MADA(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True, nonfinite="ignore")
    else:
        opt = O.build_optimizer("mada", model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    batches = _batches("cuda", torch.float32)
    for x, y in batches[:3]:  # compile, allocate, record
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in batches[3:]:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fused_hyper_kernels_first_compiled_for_small_tensors_are_right_on_large_ones():
    """Inductor generates a kernel's reductions for the size it compiles for (on a GPU the split of
    each sum, or a persistent reduction for a size known to be small), and its cache keeps no guard on
    our symbolic sizes. So the hypergradients of a 2^22-element parameter, from fused kernels first
    compiled in this process for 300 elements, must equal the eager engine's on the same device. A
    kernel served the small tensor's code sums too little; an H100 run did this before the cache was
    keyed by layout (``optimizers.compiled._LayoutKey``)."""
    def run(n, fused):
        gen = torch.Generator().manual_seed(n)
        p = torch.randn(n, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
        opt = H.HyperOptimizer([p], "mada", lr=1e-2, fused=fused, **MADA_INTERIOR)
        for k in range(2):  # the second step's hypergradient: the vjp kernel on the large tensor (later
            # steps would compare coefficients moved by hypergradients that sum 2^22 terms: chaotic)
            p.grad = torch.sin((k + 1) * p.detach()) + 0.1 * p.detach()
            opt.step()
        return p.detach(), opt

    run(300, True)  # the fused kernels' first compilation: a small tensor
    fused, eager = run(1 << 22, True)[1].hypergradients(), run(1 << 22, False)[1].hypergradients()
    # Sums of 2^22 terms in another order: equal to rounding relative to the largest (beta1's is zero
    # but for rounding at this step, m being zero before it). The coefficients and parameters after
    # the step are not compared: the hyper-optimizer's first Adam step moves a coefficient by its lr
    # whatever the size of its hypergradient, rounding noise included.
    scale = max(a.abs().max() for a in eager.values())
    assert scale > 1.0
    for name, a in eager.items():
        assert (fused[name].cpu() - a.cpu()).abs().max() <= 1e-10 * scale, (name, fused[name], a)
