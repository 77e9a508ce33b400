"""Low precision: bfloat16 parameters, and bf16 autocast over float32 parameters.

``tests/test_rule_table.py`` already checks that every rule keeps bf16 dtypes and stays finite for
10 steps; here bf16 runs must also *learn* (as a float32 run does), including the hyper-optimizer,
whose coefficient vector stays float32; and under ``torch.autocast("cpu", torch.bfloat16)`` MADA's
hypergradients must stay finite and close to a float32 run on the same data.

``state_dtype=torch.float32`` with bf16 parameters: the buffers are float32, each step equals a
float32 computation from the same (bf16-valued) parameters and gradients with the parameter
rounded to bf16 afterwards (checked bit for bit), MADA's hypergradients follow a float32-parameter
run more closely than with bf16 buffers, state_dict keeps float32 buffers, and training works
under autocast.
"""
import copy
import io

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


# ----------------------------------------------------------------------------- state_dtype
STATE_RULES = [("adamw", {}), ("mada", dict(beta3=0.3, c=0.6, rho=0.6, gamma=0.8)), ("lion", {}),
               ("sgd", dict(momentum=0.9)), ("nadam", {}), ("adan", {})]


def _grad_at(params, step):
    """A deterministic gradient of the current (bf16-valued) parameters, rounded to bf16."""
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.sin(3 * p.detach().float()) + 0.1 * torch.randn(p.shape, generator=g)).to(torch.bfloat16)
            for p in params]


def _bf16_pair(seed=0):
    """bf16 parameters and float32 twins holding the same values."""
    model = make_model(torch.bfloat16, seed)
    twin = make_model(torch.float32, seed)
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin.parameters()):
            q.copy_(p.float())
    return list(model.parameters()), list(twin.parameters())


def _step_with_rounded_reference(opt, ref, params, ref_params, step):
    """One step of ``opt`` on the bf16 ``params`` and of the float32 reference ``ref`` on its twins, from
    the same bf16 gradient (upcast for the reference); then the reference's parameters are rounded to
    bf16, as a float32 computation whose parameter is rounded once per step."""
    for p, q, g in zip(params, ref_params, _grad_at(params, step)):
        p.grad, q.grad = g, g.float()
    opt.step()
    ref.step()
    with torch.no_grad():
        for q in ref_params:
            q.copy_(q.to(torch.bfloat16).float())


def _assert_equal_to_reference(opt, ref, params, ref_params, where):
    """bf16 parameters equal to the (rounded) reference's, float32 buffers equal to its buffers, bit for bit."""
    for p, q in zip(params, ref_params):
        assert p.dtype == torch.bfloat16 and torch.equal(p.float(), q), where
        for key, buf in opt.state[p].items():
            if torch.is_tensor(buf) and key != "step":
                assert buf.dtype == torch.float32 and torch.equal(buf, ref.state[q][key]), (*where, key)


@pytest.mark.parametrize("rule, kw", STATE_RULES, ids=[r for r, _ in STATE_RULES])
def test_state_dtype_float32_equals_float32_computation_rounded_to_bf16(rule, kw):
    """Oracle: float32 buffers, gradient upcast, update in float32, parameter rounded once to bf16; the
    reference is the float32 optimizer on float32 copies whose parameters are rounded to bf16 after
    every step. Bit-identical parameters and buffers for 5 steps (weight decay included)."""
    params, ref_params = _bf16_pair()
    opt = O.build_optimizer(rule, params, lr=1e-2, weight_decay=0.1, state_dtype=torch.float32, **kw)
    ref = O.build_optimizer(rule, ref_params, lr=1e-2, weight_decay=0.1, **kw)
    for step in range(5):
        _step_with_rounded_reference(opt, ref, params, ref_params, step)
        _assert_equal_to_reference(opt, ref, params, ref_params, (rule, step))
    # and it is not the bf16-buffer run (the option changes the numbers)
    plain_params, _ = _bf16_pair()
    plain = O.build_optimizer(rule, plain_params, lr=1e-2, weight_decay=0.1, **kw)
    for step in range(5):
        for p, g in zip(plain_params, _grad_at(plain_params, step)):
            p.grad = g
        plain.step()
    assert any(not torch.equal(p, q) for p, q in zip(params, plain_params)) or rule == "lion"


def test_state_dtype_hyper_optimizer_equals_float32_computation():
    """MADA with bf16 parameters and float32 state: the recorded gradient and buffers are float32, and
    coefficients, hypergradients, buffers and (rounded) parameters equal a float32 MADA's bit for bit."""
    params, ref_params = _bf16_pair()
    kw = dict(lr=1e-2, weight_decay=0.1, beta3=0.3, c=0.6, rho=0.6, gamma=0.8)
    opt = H.MADA(params, state_dtype=torch.float32, **kw)
    ref = H.MADA(ref_params, **kw)
    for step in range(6):
        _step_with_rounded_reference(opt, ref, params, ref_params, step)
        assert opt._records0[0]["g"].dtype == torch.float32
        for k, v in ref.coefficients().items():
            assert torch.equal(opt.coefficients()[k], v), (step, k)
        for k, v in ref.hypergradients().items():
            assert torch.equal(opt.hypergradients()[k], v), (step, k)
        _assert_equal_to_reference(opt, ref, params, ref_params, (step,))
    assert any((opt.coefficients()[k] != v) for k, v in dict(beta1=0.9, beta2=0.95).items())


# The hypergradients of bf16-parameter runs are compared with a float32-parameter run through the
# RMS over steps 1..STATE_STEPS-1 and all six coefficients of (h - h_ref), relative to the RMS of
# h_ref. bf16 gradients carry ~1% round-off whatever the buffers, so neither run is close to 1e-3;
# float32 buffers remove the round-off of the buffers themselves (an EMA with 1 - beta2 = 0.05 adds
# increments of 5% of the buffer, a few bf16 ulps). Measured on this problem: bf16 buffers 0.0052,
# float32 buffers 0.0030 (on 6 seeds, 0.004-0.006 vs 0.0023-0.0032). The hyper-level is plain SGD:
# Adam's first hyper-steps turn the round-off of near-zero hypergradients into steps of the
# hyper-learning rate with a random sign (see tests/test_distributed.py), which would swamp the
# comparison.
STATE_STEPS, STATE_RMS_TOL = 50, 0.01


def _hyper_run(param_dtype, state_dtype, data):
    model = make_model(param_dtype)
    opt = H.MADA(model.parameters(), lr=1e-2, weight_decay=0.01, beta3=0.3, c=0.6, rho=0.6, gamma=0.8,
                 tower=H.Level("sgd", lr=1e-3), state_dtype=state_dtype)
    hypergrads = []
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x.to(param_dtype)).float(), y).backward()
        opt.step()
        hypergrads.append(opt.hypergradients())
    return model, opt, hypergrads


def test_state_dtype_float32_hypergradients_closer_to_float32_run():
    data = make_data(STATE_STEPS, seed=0)
    _, _, ref = _hyper_run(torch.float32, None, data)
    errors = {}
    for name, state_dtype in (("bf16 state", None), ("float32 state", torch.float32)):
        model, opt, hg = _hyper_run(torch.bfloat16, state_dtype, data)
        assert all(math.isfinite(v.item()) for h in hg[1:] for v in h.values()), name
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        num = sum((hg[s][k] - ref[s][k]).item() ** 2 for s in range(1, STATE_STEPS) for k in ref[s])
        den = sum(ref[s][k].item() ** 2 for s in range(1, STATE_STEPS) for k in ref[s])
        errors[name] = math.sqrt(num / den)
    assert errors["float32 state"] < errors["bf16 state"], errors
    assert errors["float32 state"] < STATE_RMS_TOL, errors


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kind", ["rule", "hyper"])
def test_state_dtype_survives_state_dict_round_trip(kind):
    """torch's load_state_dict casts buffers to the parameter's dtype; with state_dtype they stay float32,
    bit for bit, and the resumed run equals the uninterrupted one."""
    def make(params):
        if kind == "rule":
            return O.RuleOptimizer(params, "mada", lr=1e-2, weight_decay=0.01, state_dtype=torch.float32,
                                   beta3=0.3, c=0.6, rho=0.6, gamma=0.8)
        return H.MADA(params, lr=1e-2, weight_decay=0.01, state_dtype=torch.float32)
    data = make_data(6, seed=3)
    model = make_model(torch.bfloat16)
    opt = make(model.parameters())
    for x, y in data[:3]:
        opt.zero_grad()
        nn.functional.mse_loss(model(x.to(torch.bfloat16)).float(), y).backward()
        opt.step()
    resumed_model = copy.deepcopy(model)
    resumed = make(resumed_model.parameters())
    resumed.load_state_dict(_round_trip(opt.state_dict()))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        for key, buf in opt.state[p].items():
            if torch.is_tensor(buf) and key != "step":
                assert resumed.state[q][key].dtype == torch.float32 and torch.equal(resumed.state[q][key], buf), key
    for m, o in ((model, opt), (resumed_model, resumed)):
        for x, y in data[3:]:
            o.zero_grad()
            nn.functional.mse_loss(m(x.to(torch.bfloat16)).float(), y).backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))
    if kind == "hyper":
        assert all(torch.equal(v, resumed.hypergradients()[k]) for k, v in opt.hypergradients().items())


def test_state_dtype_under_autocast():
    """bf16 parameters, float32 buffers, forward under torch.autocast("cpu", bfloat16): loss goes down,
    buffers stay float32, hypergradients finite."""
    data = make_data(1) * STEPS
    model = make_model(torch.bfloat16)
    opt = H.MADA(model.parameters(), lr=1e-2, weight_decay=0.01, beta3=0.3, c=0.6, rho=0.6, gamma=0.8,
                 state_dtype=torch.float32)
    losses = []
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = nn.functional.mse_loss(out.float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert all(torch.isfinite(v) for v in opt.hypergradients().values())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.7 * losses[0], losses
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        assert all(b.dtype == torch.float32 for k, b in opt.state[p].items() if torch.is_tensor(b) and k != "step")


def test_state_dtype_fused_rule_optimizer_matches_eager():
    """RuleOptimizer(fused=True, state_dtype=float32) on bf16 parameters: float32 buffers, and the same
    parameters as the eager path (up to 1 bf16 ulp where the compiled arithmetic rounds differently)."""
    runs = []
    for fused in (False, True):
        params, _ = _bf16_pair()
        opt = O.RuleOptimizer(params, "adamw", lr=1e-2, weight_decay=0.1, fused=fused, state_dtype=torch.float32)
        for step in range(4):
            for p, g in zip(params, _grad_at(params, step)):
                p.grad = g
            opt.step()
        assert all(b.dtype == torch.float32 for p in params for k, b in opt.state[p].items() if k != "step")
        runs.append((params, opt))
    (eager, eager_opt), (fused_p, fused_opt) = runs
    for p, q in zip(eager, fused_p):
        assert q.dtype == torch.bfloat16
        ulp = torch.finfo(torch.bfloat16).eps * p.float().abs().clamp_min(1e-3)
        assert ((p.float() - q.float()).abs() <= ulp).all()
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused_opt.state[q][key], eager_opt.state[p][key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [torch.int32, torch.complex64, "float32", 32, torch.bool])
def test_state_dtype_rejects_non_floating_dtypes(bad):
    param = [nn.Parameter(torch.zeros(3))]
    for make in (lambda: O.RuleOptimizer(param, "adamw", state_dtype=bad),
                 lambda: O.build_optimizer("sgd", param, state_dtype=bad),
                 lambda: H.MADA(param, state_dtype=bad),
                 lambda: H.HyperSGD(param, state_dtype=bad)):
        with pytest.raises(ValueError, match="state_dtype"):
            make()


def test_state_dtype_fused_hyper_optimizer_refused():
    """The fused hyper kernels compute in the parameters' dtype: a different state_dtype is refused."""
    bf16 = [nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="fused=True with state_dtype"):
        H.MADA(bf16, fused=True, state_dtype=torch.float32)
    opt = H.MADA([nn.Parameter(torch.zeros(3))], fused=True, state_dtype=torch.float32)  # same dtype: fine
    with pytest.raises(ValueError, match="fused=True with state_dtype"):
        opt.add_param_group({"params": bf16})
    assert len(opt.param_groups) == 1  # refused before anything changed
