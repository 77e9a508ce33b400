"""Low precision: bfloat16 parameters, and bf16 autocast over float32 parameters.

``tests/test_rule_table.py`` already checks that every rule keeps bf16 dtypes and stays finite for
10 steps; here bf16 runs must also *learn* (as a float32 run does), including the hyper-optimizer,
whose coefficient vector stays float32; and under ``torch.autocast("cpu", torch.bfloat16)`` MADA's
hypergradients must stay finite and close to a float32 run on the same data.
"""
import math

import pytest
import torch
from torch import nn

import hypergrad as H
import optimizers as O

STEPS = 30

OPTIMIZERS = [
    ("rule:adamw", lambda params: O.RuleOptimizer(params, "adamw", lr=1e-2, weight_decay=0.01)),
    ("rule:mada", lambda params: O.RuleOptimizer(params, "mada", lr=1e-2, weight_decay=0.01,
                                                 beta3=0.3, c=0.6, rho=0.6, gamma=0.8)),
    ("hyper:MADA", lambda params: H.MADA(params, lr=1e-2, weight_decay=0.01, beta3=0.3, c=0.6, rho=0.6, gamma=0.8)),
]


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4)).to(dtype)


def make_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 4, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(64, 16, generator=g)
        out.append((x, torch.tanh(x @ w) + 0.1 * torch.randn(64, 4, generator=g)))
    return out


def run(name, dtype, data, autocast=False):
    model = make_model(dtype)
    opt = dict(OPTIMIZERS)[name](model.parameters())
    losses, hypergrads = [], []
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x.to(dtype))
        loss = nn.functional.mse_loss(out.float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if isinstance(opt, H.HyperOptimizer):
            hypergrads.append(opt.hypergradients())
    return model, opt, losses, hypergrads


@pytest.mark.parametrize("name", [n for n, _ in OPTIMIZERS])
def test_bf16_parameters_train_and_stay_finite(name):
    data = make_data(1) * STEPS  # one batch, so the loss must go down
    model, opt, losses, hypergrads = run(name, torch.bfloat16, data)
    _, _, losses32, _ = run(name, torch.float32, data)
    final = losses[-1]
    assert math.isfinite(final) and final < 0.7 * losses[0], f"{name}: bf16 loss {losses[0]:.4f} -> {final:.4f}"
    # learns about as well as float32 (bf16 keeps 8 significant bits: updates below half an ulp of a
    # weight are lost, so allow some slack)
    assert final < 1.3 * losses32[-1] + 0.02, f"{name}: bf16 {final:.4f} vs float32 {losses32[-1]:.4f}"
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        for key, buf in opt.state[p].items():
            if torch.is_tensor(buf) and key != "step":
                assert buf.dtype == torch.bfloat16 and torch.isfinite(buf).all(), key
    if isinstance(opt, H.HyperOptimizer):
        coefs = opt.coefficients()
        family = opt.family
        for k, v in coefs.items():
            assert v.dtype == torch.float32 and torch.isfinite(v), k  # the hyper state stays float32
            assert family.coefficients[k].domain.contains(v), (k, v)
        assert all(torch.isfinite(v) for h in hypergrads[1:] for v in h.values())
        assert any(v != 0 for v in hypergrads[-1].values())


# Tolerance for the autocast comparison, per step, relative to that step's largest float32
# hypergradient M = max_k |h_k|:
#
# * bf16 keeps 8 significant bits (unit round-off 2^-8 ~ 0.4%). Autocast rounds the inputs and the
#   output of every matmul to bf16, so each gradient entry carries an error of roughly 1%.
# * A hypergradient is a dot product g_t . dDelta/dq over all parameters whose terms partly cancel;
#   its relative error is the gradients' (~1%) times the cancellation ratio sum|terms| / |sum terms|.
#   For the dominant ones (|h_k| >= M/4) that ratio is small: measured <= 2% relative error here
#   (<= 6% over 7 steps of a wider probe); we require the same sign and <= 20%.
# * Small ones (cancellation-dominated, and beta1/beta2 at t=1, which are exactly 0 in exact
#   arithmetic and pure round-off in floating point) may have any relative error or sign; they are
#   held to an absolute error of M/10 (measured <= M/70 here).
# The two runs also drift apart through the coefficients they learn, so only the first steps count.
DOMINANT, REL_TOL, ABS_TOL, COMPARED_STEPS = 0.25, 0.20, 0.10, 6


def test_autocast_bf16_hypergradients_close_to_float32():
    data = make_data(COMPARED_STEPS + 1, seed=1)
    model, opt, _, amp = run("hyper:MADA", torch.float32, data, autocast=True)
    _, _, _, ref = run("hyper:MADA", torch.float32, data, autocast=False)
    # autocast leaves parameters, gradients, buffers and coefficients in float32
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        assert all(b.dtype == torch.float32 for k, b in opt.state[p].items() if torch.is_tensor(b) and k != "step")
    assert amp[0] == {} and ref[0] == {}
    checked_dominant = 0
    for step in range(1, COMPARED_STEPS + 1):
        got, want = amp[step], ref[step]
        assert got.keys() == want.keys() == set(opt.learn)
        scale = max(abs(v.item()) for v in want.values())
        assert scale > 0
        for k in want:
            a, b = got[k].item(), want[k].item()
            assert math.isfinite(a), (step, k)
            assert abs(a - b) <= ABS_TOL * scale, f"step {step} {k}: autocast {a:.3e} vs float32 {b:.3e}"
            if abs(b) >= DOMINANT * scale:
                checked_dominant += 1
                assert a * b > 0, f"step {step} {k}: sign differs, autocast {a:.3e} vs float32 {b:.3e}"
                assert abs(a - b) <= REL_TOL * abs(b), f"step {step} {k}: autocast {a:.3e} vs float32 {b:.3e}"
    assert checked_dominant >= COMPARED_STEPS  # at least one dominant coefficient per step
