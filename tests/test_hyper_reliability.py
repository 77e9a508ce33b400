"""HyperOptimizer checkpoints resume exactly; non-finite values never reach the model or the coefficients."""
import io

import pytest
import torch
from torch import nn

import hypergrad as H
import optimizers as O
from hypergrad.gradcheck import MADA_INTERIOR, builtin_problem


def _tower():
    return [H.Level("adam", lr=1e-3, learn=["lr"]), H.Level("sgd", lr=1e-4, momentum=0.5, learn=["lr"]),
            H.Level("sgd", lr=1e-6)]


def _make(backend, model, fused=False, **kwargs):
    return H.HyperOptimizer(model.parameters(), "mada", lr=1e-2, weight_decay=0.1, backend=backend,
                            tower=_tower(), fused=fused, **MADA_INTERIOR, **kwargs)


def _steps(model, opt, loss_fns):
    for loss_fn in loss_fns:
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()


@pytest.mark.parametrize("backend,fused,interval", [("functional", False, 1), ("graph", False, 1),
                                                    ("functional", True, 1), ("functional", False, 3),
                                                    ("functional", True, 3)])
def test_state_dict_resume_is_exact(backend, fused, interval):
    """Saved and resumed, the run continues bit for bit. Learning every third step (records at steps 1,
    4, 7...), the save falls between the recorded update of step 7 and step 8, which learns from it."""
    split = 8 if interval == 1 else 7
    model, loss_fns = builtin_problem(16, seed=5)
    opt = _make(backend, model, fused=fused, hyper_interval=interval)
    _steps(model, opt, loss_fns[:split])
    assert opt._records0 is not None
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _steps(model, opt, loss_fns[split:])

    resumed_model, _ = builtin_problem(16, seed=99)  # different weights until loaded
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model.load_state_dict(saved["model"])
    resumed = _make(backend, resumed_model, fused=fused, hyper_interval=interval)
    resumed.load_state_dict(saved["opt"])
    _steps(resumed_model, resumed, loss_fns[split:])

    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for qa, qb in zip(opt._q, resumed._q):
        assert torch.equal(qa, qb)
    for da, db in zip(opt.tower_hypergradients(), resumed.tower_hypergradients()):
        assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


def test_load_refuses_a_different_hyper_optimizer():
    model, loss_fns = builtin_problem(3, seed=0)
    opt = _make("functional", model)
    _steps(model, opt, loss_fns)
    other = H.MADA(model.parameters(), lr=1e-2)  # depth-1 tower
    with pytest.raises(ValueError, match="different hyper-optimizer"):
        other.load_state_dict(opt.state_dict())
    plain = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="hyper"):
        H.MADA(model.parameters()).load_state_dict(plain.state_dict())


# The fused path checks recorded gradients through the sums its vjp kernels return (no extra pass),
# and gradients outside the last update's records up front: both ways are injected here.
@pytest.mark.parametrize("backend,fused,value,where", [
    ("functional", False, "nan", "recorded"), ("graph", False, "nan", "recorded"),
    ("functional", True, "nan", "recorded"), ("functional", True, "inf", "recorded"),
    ("functional", True, "-inf", "recorded"), ("functional", True, "nan", "new")])
def test_nan_gradient_skips_the_step(backend, fused, value, where):
    model, loss_fns = builtin_problem(6, seed=0)
    opt = _make(backend, model, fused=fused)
    if where == "new":  # fc1.weight gets no gradient at the last good step: it is not in the records
        for loss_fn in loss_fns[:3]:
            opt.zero_grad()
            loss_fn(model).backward()
            if loss_fn is loss_fns[2]:
                model.fc1.weight.grad = None
            opt.step()
        assert opt.fused and all(model.fc1.weight is not p for r in opt._records0 for p in r["params"])
    else:
        _steps(model, opt, loss_fns[:3])
    before = [p.detach().clone() for p in model.parameters()]
    q_before = [q.clone() for q in opt._q]
    opt.zero_grad()
    loss_fns[3](model).backward()
    model.fc1.weight.grad[0, 0] = float(value)
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(q_before, opt._q))
    _steps(model, opt, loss_fns[4:])  # training continues from the last good update
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(q).all() for q in opt._q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_check_is_exact(dtype):
    """The up-front check sums each gradient (float32 accumulation, float64 for float64): a NaN or Inf
    anywhere is caught, and a finite gradient whose sum overflows is not reported (checked
    elementwise), against torch.isfinite."""
    from hypergrad.optimizer import _all_finite

    big = torch.finfo(dtype).max
    cases = [torch.ones(1000, dtype=dtype),  # 1000 in half precision's sum: fine in float32
             torch.full((8,), big, dtype=dtype),  # finite, but its sum overflows float32 (or float64)
             torch.tensor([1.0, float("nan")], dtype=dtype), torch.tensor([float("inf"), 2.0], dtype=dtype),
             torch.tensor([float("inf"), float("-inf")], dtype=dtype)]
    for t in cases:
        assert _all_finite([torch.zeros(3, dtype=dtype), t]) == bool(torch.isfinite(t).all())
    assert _all_finite([])


@pytest.mark.parametrize("fused", [False, True])
def test_mada_update_is_finite_until_a_gradient_square_overflows(fused):
    """What the fused path relies on (it cannot hold back a non-finite update): MADA's update is finite
    for finite gradients, from zero and subnormal to large ones, at every vertex and in the interior,
    over several steps (the moments and g_prev carry the extremes), as long as g^2 does not overflow
    (|g| < ~1.8e19 in float32); past that, the eager path holds the update back (or raises)."""
    f32 = torch.finfo(torch.float32)
    values = torch.tensor([0.0, f32.tiny, -f32.tiny, 1e-45, 1e-30, 1.0, -1.0, 1e18, -1e18, 3e18])
    points = [{}, MADA_INTERIOR] + [dict(v) for v in O.get_rule("mada").vertices.values()]
    for point in points:
        p = nn.Parameter(torch.zeros(len(values)))
        opt = H.MADA([p], lr=1e-3, weight_decay=0.1, fused=fused, nonfinite="raise", **point)
        for k in range(4):
            p.grad = values.roll(k) * (-1) ** k
            opt.step()
            assert torch.isfinite(p).all(), (point, k, p)
        assert opt.skipped_updates == 0 and opt.skipped_steps == 0
    if not fused:  # g^2 overflows: the update is non-finite (inf - inf in Yogi's target), and is not applied
        p = nn.Parameter(torch.zeros(2))
        opt = H.MADA([p], lr=1e-3, nonfinite="skip")
        p.grad = torch.tensor([1e30, 1.0])
        opt.step()
        assert opt.skipped_updates == 1 and torch.equal(p.detach(), torch.zeros(2))


@pytest.mark.parametrize("fused,nonfinite", [(False, "skip"), (True, "skip"), (True, "raise")])
def test_non_finite_update_from_a_finite_gradient(fused, nonfinite):
    """A finite gradient whose square overflows (float64 here) makes MADA's update non-finite. The
    eager path holds it back (``skipped_updates``) and trains on; the fused path applies it in the
    loop that computes it, and its next step, whose gradient the broken parameters make non-finite,
    raises naming their group instead of skipping every step from then on."""
    model, loss_fns = builtin_problem(6, seed=0)
    # MADA's defaults (c = 1): the overflowing square makes Yogi's half 0 * inf = NaN
    opt = H.MADA(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused, nonfinite=nonfinite)
    _steps(model, opt, loss_fns[:2])
    opt.zero_grad()
    loss_fns[2](model).backward()
    model.fc1.weight.grad[0, 0] = 1e200
    before = model.fc1.weight.detach().clone()
    opt.step()
    if not fused:
        assert opt.skipped_updates == 1 and torch.equal(model.fc1.weight.detach(), before)
        _steps(model, opt, loss_fns[3:])
        assert all(torch.isfinite(p).all() for p in model.parameters())
        return
    assert not torch.isfinite(model.fc1.weight).all()  # applied: the fused path could not hold it back
    opt.zero_grad()
    loss_fns[3](model).backward()
    message = r"non-finite parameters in param group\(s\) \[0\]: a non-finite update was applied"
    with pytest.raises(FloatingPointError, match=message):
        opt.step()


def test_fused_update_whose_sum_overflows_is_not_reported():
    """Huge but finite SGD gradients and updates whose sums overflow float32: the fused path neither
    skips a step nor reports non-finite parameters."""
    p = nn.Parameter(torch.zeros(1000))
    opt = H.HyperOptimizer([p], "sgd", lr=1e-2, learn=["momentum"], momentum=0.5, fused=True)
    for g in (1.0, 1e38, 1.0):  # the update of the second step is -1e36 per element, its sum -1e39
        p.grad = torch.full((1000,), g)
        opt.step()
    assert opt.skipped_steps == 0 and torch.isfinite(p).all()


def test_huge_finite_gradient_is_not_skipped():
    p = nn.Parameter(torch.zeros(4))
    opt = H.MADA([p], lr=1e-3)
    p.grad = torch.full((4,), 3e38)  # finite; its float32 sum is inf
    opt.step()
    assert opt.skipped_steps == 0  # not taken for a non-finite gradient (the update itself may be 0: g^2 overflows)


def test_nan_hypergradient_keeps_coefficients(monkeypatch):
    model, loss_fns = builtin_problem(6, seed=0)
    opt = _make("functional", model)
    _steps(model, opt, loss_fns[:3])
    q_before = [q.clone() for q in opt._q]
    real = H.HyperOptimizer._collect_hypergradients

    def poisoned(self):
        d = real(self)
        d[1] = d[1] * float("inf")  # level 2's hypergradient overflows
        return d

    monkeypatch.setattr(H.HyperOptimizer, "_collect_hypergradients", poisoned)
    before = [p.detach().clone() for p in model.parameters()]
    _steps(model, opt, loss_fns[3:4])
    assert opt.skipped_hyper_steps == 1 and opt.skipped_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(q_before, opt._q))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model still trains
    monkeypatch.setattr(H.HyperOptimizer, "_collect_hypergradients", real)
    _steps(model, opt, loss_fns[4:])
    assert not all(torch.equal(a, b) for a, b in zip(q_before, opt._q))


def test_nonfinite_update_is_not_applied():
    """Finite gradient, non-finite update (a family dividing by g): the parameters must not move."""

    family = O.Family("inverse", [O.Coefficient("a", 1.0, O.Interval(0.0, 2.0))], O.Coef("a") / O.grad)
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = H.HyperOptimizer([p], family, lr=1e-2, tower=H.Level("sgd", lr=1e-3))
    p.grad = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    opt.step()
    assert opt.skipped_updates == 1 and opt.skipped_steps == 0
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_raise_policy(fused):
    model, loss_fns = builtin_problem(3, seed=0)
    opt = H.MADA(model.parameters(), lr=1e-2, nonfinite="raise", fused=fused)
    _steps(model, opt, loss_fns[:1])  # a recorded update: the fused path checks through its vjp kernels
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_fns[1](model).backward()
    model.fc2.bias.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in \(param group, index\) \[\(0, 3\)\]"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="nonfinite"):
        H.MADA(model.parameters(), nonfinite="clamp")
