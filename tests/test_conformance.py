"""``torch.optim`` conformance battery over every optimizer the toolkit exports.

Modeled on PyTorch's own optimizer tests (test/optim/test_optim.py, OptimizerInfo): one table of
optimizers, one set of behaviours every ``torch.optim.Optimizer`` must have. A new optimizer joins
every check by adding one ``(name, factory)`` row to ``OPTIMIZERS``.

``tests/test_rule_table.py`` checks the update *rules* in depth (every rule and MADA vertex, three
dtypes, step counts of skipped parameters...); this battery checks the optimizer *objects* —
including the fused path and the hyper-optimizers, which that table does not cover — on the
torch.optim machinery: missing gradients, param groups added later, ``zero_grad`` modes, strided
and 0-d parameters, LR schedulers, ``state_dict``, ``deepcopy``, closures, float32/float64.

Optimizers that learn their lr refuse an LR scheduler loudly (the scheduler would be ignored).
"""
import copy
import io

import pytest
import torch
from torch import nn

import hypergrad as H
import optimizers as O
from conftest import flat, train_on   # the shared training loop and parameter vector (tests/conftest.py)

# ----------------------------------------------------------------------------- the table
RULE_LR = {"sgd": 0.05, "sgd_nesterov": 0.05, "lion": 3e-3}
RULE_KW = {"sgd": dict(momentum=0.9, dampening=0.1), "sgd_nesterov": dict(momentum=0.9),
           "mada": dict(beta3=0.3, c=0.5, rho=0.5, gamma=0.8)}
# The fused path compiles (torch.compile, seconds per variant on a CPU): keep its subset small.
FUSED = ["adamw", "mada"]
# One compiled kernel per (rule, weight-decay mode) shared by every fused optimizer of this module:
# FusedKernel compiles per instance, and a fresh compilation per test would cost minutes. Sharing
# changes nothing numerically: the kernel is a pure function of the rule and its inputs.
_FUSED_KERNELS = {}


def _rule(name, fused=False):
    def factory(params):
        opt = O.RuleOptimizer(params, name, lr=RULE_LR.get(name, 1e-2), weight_decay=0.01, fused=fused,
                              **RULE_KW.get(name, {}))
        if fused:
            opt._kernels = _FUSED_KERNELS.setdefault(name, {})
        return opt
    return factory


def _tower2(params):
    """Depth-2 tower: Adam learns MADA's betas and gamma, SGD learns that Adam's learning rate."""
    return H.HyperOptimizer(params, "mada", lr=1e-2, weight_decay=0.01, learn=("beta1", "beta2", "gamma"),
                            tower=[H.Level("adam", lr=1e-3, learn=["lr"]), H.Level("sgd", lr=1e-5)],
                            beta3=0.3, c=0.5, rho=0.5, gamma=0.8)


_HYPER_KERNELS = {}


def _fused_mada(params):
    """MADA on the fused hyper-learning path (compiled per-tensor vjp and update kernels)."""
    opt = H.MADA(params, lr=1e-2, weight_decay=0.01, fused=True)
    opt._hyper_kernels = _HYPER_KERNELS  # shared compilations, as for _FUSED_KERNELS
    return opt


OPTIMIZERS = (
    [(f"rule:{n}", _rule(n)) for n in O.RULES]
    + [(f"fused:{n}", _rule(n, fused=True)) for n in FUSED]
    + [
        ("hyper:MADA", lambda params: H.MADA(params, lr=1e-2, weight_decay=0.01)),
        ("hyper:HyperAdam", lambda params: H.HyperAdam(params, lr=1e-2, weight_decay=0.01)),
        ("hyper:HyperSGD", lambda params: H.HyperSGD(params, lr=0.05, hyper_lr=1e-3)),
        ("hyper:tower2", _tower2),
        ("hyper:MADA-fused", _fused_mada),
        # buffers and update arithmetic in float64 whatever the parameters' dtype (state_dtype)
        ("rule:mada/state64", lambda params: O.RuleOptimizer(params, "mada", lr=1e-2, weight_decay=0.01,
                                                             state_dtype=torch.float64, **RULE_KW["mada"])),
        ("hyper:MADA/state64", lambda params: H.MADA(params, lr=1e-2, weight_decay=0.01, state_dtype=torch.float64)),
    ]
)
# The fused hyper-learning entry compiles new variants of its kernels in many checks: ~55 s with
# a cold Inductor cache, a few seconds warm. It runs by default (it used to be opt-in, and two
# bugs of the fused path hid there: opt.state[p] read the lagging buffers, and an optimizer whose
# only group was empty at its first step crashed at its second).
NAMES = [n for n, _ in OPTIMIZERS]
FACTORY = dict(OPTIMIZERS)
HYPER = [n for n in NAMES if n.startswith("hyper:")]
LEARNS_LR = {"hyper:HyperSGD"}


def cases(**marks_by_reason):
    """``NAMES`` as parameters; ``{reason: (names, exception)}`` attaches strict xfail marks that
    accept only that exception (anything else is a real failure)."""
    out = []
    for name in NAMES:
        marks = [pytest.mark.xfail(strict=True, raises=raises, reason=reason)
                 for reason, (names, raises) in marks_by_reason.items() if name in names]
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def test_table_covers_every_exported_optimizer():
    assert {f"rule:{n}" for n in O.RULES} <= set(NAMES)
    assert {"hyper:MADA", "hyper:HyperAdam", "hyper:HyperSGD"} <= set(NAMES)
    assert {f"fused:{n}" for n in FUSED} <= set(NAMES) and FUSED
    for name, factory in OPTIMIZERS:
        opt = factory([nn.Parameter(torch.zeros(2, dtype=torch.float64))])  # constructing compiles nothing
        assert isinstance(opt, torch.optim.Optimizer), name


# ----------------------------------------------------------------------------- the problem
def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def batches(n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g, dtype=torch.float64).to(dtype),
             torch.randn(8, 3, generator=g, dtype=torch.float64).to(dtype)) for _ in range(n)]


def loss_of(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def train(model, opt, data, set_to_none=True):
    return train_on(model, opt, data, loss=loss_of, set_to_none=set_to_none)


def hyper_view(opt):
    """What a HyperOptimizer learned (empty for rule optimizers): coefficients and tower values."""
    if not isinstance(opt, H.HyperOptimizer):
        return []
    out = [v for v in opt.coefficients().values()]
    for level in opt.tower_values():
        out += list(level.values())
    return [v.detach().clone() for v in out]


# ----------------------------------------------------------------------------- checks
@pytest.mark.parametrize("name", cases())
def test_parameters_without_gradient_are_untouched(name):
    """A parameter that never gets a gradient is neither moved (not even by weight decay) nor given
    state; one that misses a step keeps its value and state through that step."""
    model = make_model()
    unused = nn.Parameter(torch.randn(5, 2, dtype=torch.float64))
    frozen = nn.Parameter(torch.randn(3, dtype=torch.float64), requires_grad=False)
    unused0, frozen0 = unused.detach().clone(), frozen.detach().clone()
    sometimes = model[2].bias
    opt = FACTORY[name]([*model.parameters(), unused, frozen])
    for i, batch in enumerate(batches(6)):
        opt.zero_grad(set_to_none=True)
        loss_of(model, batch).backward()
        if i % 2:
            sometimes.grad = None
            before = sometimes.detach().clone()
            state_before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[sometimes].items()}
        opt.step()
        if i % 2:
            assert torch.equal(sometimes, before)
            for k, v in state_before.items():
                now = opt.state[sometimes][k]
                assert (torch.equal(now, v) if torch.is_tensor(v) else now == v), k
    assert torch.equal(unused.detach(), unused0) and torch.equal(frozen.detach(), frozen0)
    assert not opt.state.get(unused) and not opt.state.get(frozen)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", cases())
def test_add_param_group_later_trains_the_new_parameters(name):
    model = make_model()
    first, rest = list(model[0].parameters()), list(model[2].parameters())
    opt = FACTORY[name](first)
    data = batches(6)
    train(model, opt, data[:2])
    frozen_rest = flat(rest)
    assert torch.equal(flat(rest), frozen_rest)
    opt.add_param_group({"params": rest})
    before_first, before_rest = flat(first), flat(rest)
    train(model, opt, data[2:])
    assert not torch.equal(flat(rest), before_rest), "parameters of the added group must train"
    assert not torch.equal(flat(first), before_first)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", cases())
def test_empty_param_group_then_add_param_group(name):
    """Constructed with one empty param group, stepping is a no-op; groups added later train."""
    model = make_model()
    opt = FACTORY[name]([{"params": []}])
    assert opt.step() is None
    opt.add_param_group({"params": list(model.parameters())})
    before = flat(model.parameters())
    train(model, opt, batches(4))
    after = flat(model.parameters())
    assert torch.isfinite(after).all()
    assert all(not torch.equal(p, q) for p, q in zip(before.split([p.numel() for p in model.parameters()]),
                                                          after.split([p.numel() for p in model.parameters()])))


@pytest.mark.parametrize("name", cases())
def test_zero_grad_set_to_none_and_in_place_give_the_same_run(name):
    results = []
    for set_to_none in (True, False):
        model = make_model()
        opt = FACTORY[name](model.parameters())
        train(model, opt, batches(5), set_to_none=set_to_none)
        opt.zero_grad(set_to_none=set_to_none)
        grads = [p.grad for p in model.parameters()]
        if set_to_none:
            assert all(g is None for g in grads)
        else:
            assert all(g is not None and not g.any() for g in grads)
        results.append((flat(model.parameters()), hyper_view(opt)))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def _strided_problem(name, contiguous, steps=5):
    """A transposed-view weight (non-contiguous unless ``contiguous``), a 0-d scale and a bias."""
    torch.manual_seed(0)
    base = torch.randn(4, 3, dtype=torch.float64)
    weight = nn.Parameter(base.t().contiguous() if contiguous else base.t())
    scale = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
    bias = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    assert weight.is_contiguous() == contiguous and scale.dim() == 0
    opt = FACTORY[name]([weight, scale, bias])
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(8, 3, generator=g, dtype=torch.float64)
        target = torch.randn(8, 4, generator=g, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(torch.tanh(x @ weight + bias) * scale, target).backward()
        opt.step()
    return (weight, scale, bias), opt


@pytest.mark.parametrize("name", cases())
def test_non_contiguous_and_zero_dim_parameters(name):
    """A transposed view made a Parameter, and a 0-d Parameter, train, stay finite, keep their shapes,
    and follow the same trajectory as the contiguous equivalent."""
    (w, s, b), opt = _strided_problem(name, contiguous=False)
    (wc, sc, bc), opt_c = _strided_problem(name, contiguous=True)
    assert w.shape == (3, 4) and s.shape == () and b.shape == (4,)
    assert torch.isfinite(w).all() and torch.isfinite(s) and torch.isfinite(b).all()
    assert s.item() != 0.7, "the 0-d parameter must train"
    for key, buf in opt.state[w].items():
        if torch.is_tensor(buf) and buf.dim() > 0:
            assert buf.shape == w.shape, key
    for key, buf in opt.state[s].items():
        if torch.is_tensor(buf):
            assert buf.dim() == 0, key
    torch.testing.assert_close(flat([w, s, b]), flat([wc, sc, bc]), rtol=0, atol=1e-12)
    # Learned coefficients: sums over all elements (the hypergradient), which the strided and the
    # contiguous layouts reduce in different orders (on the fused path: different compiled kernels),
    # then amplified by the hyper-level Adam; float64 round-off stays ~1e-12.
    for a, c in zip(hyper_view(opt), hyper_view(opt_c)):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-11)


@pytest.mark.parametrize("scheduler", ["StepLR", "OneCycleLR"])
@pytest.mark.parametrize("name", cases())
def test_lr_scheduler_drives_param_group_lr(name, scheduler):
    model = make_model()
    opt = FACTORY[name](model.parameters())
    lr0 = opt.param_groups[0]["lr"]
    steps = 6
    if scheduler == "StepLR":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    else:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr0, total_steps=steps, cycle_momentum=False)
    seen = []
    before = flat(model.parameters())
    if name in LEARNS_LR:  # a schedule would be silently ignored: it must be refused instead
        with pytest.raises(ValueError, match="learned"):
            for batch in batches(steps):
                opt.zero_grad()
                loss_of(model, batch).backward()
                opt.step()
                sched.step()
        return
    for batch in batches(steps):
        seen.append(opt.param_groups[0]["lr"])
        assert seen[-1] == sched.get_last_lr()[0]
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
        sched.step()
    assert len(set(seen)) > 1, "the scheduler must change the group's lr"
    after = flat(model.parameters())
    assert torch.isfinite(after).all() and not torch.equal(after, before)


@pytest.mark.parametrize("name", [n for n in cases() if n.values[0] not in LEARNS_LR])
def test_lr_scheduler_changes_the_trajectory(name):
    """The schedule reaches the update: a run with StepLR(gamma=0.1) differs from one without."""
    data = batches(5)
    ends = []
    for scheduled in (False, True):
        model = make_model()
        opt = FACTORY[name](model.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1) if scheduled else None
        for batch in data:
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
            if sched is not None:
                sched.step()
        ends.append(flat(model.parameters()))
    assert (ends[0] - ends[1]).abs().max().item() > 1e-6


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", cases())
def test_state_dict_into_a_fresh_optimizer_continues_identically(name):
    """state_dict -> torch.save -> torch.load(weights_only=True) -> a fresh optimizer on a copy of the
    model: continuing it gives exactly the run of continuing the original (hypergradients and learned
    coefficients included)."""
    data = batches(7)
    model = make_model()
    opt = FACTORY[name](model.parameters())
    train(model, opt, data[:3])
    loaded = _round_trip(opt.state_dict())

    resumed_model = copy.deepcopy(model)
    resumed = FACTORY[name](resumed_model.parameters())
    resumed.load_state_dict(loaded)
    fresh_model = copy.deepcopy(model)
    fresh = FACTORY[name](fresh_model.parameters())

    for m, o in ((model, opt), (resumed_model, resumed), (fresh_model, fresh)):
        train(m, o, data[3:])
    assert torch.equal(flat(model.parameters()), flat(resumed_model.parameters()))
    view, resumed_view = hyper_view(opt), hyper_view(resumed)
    assert len(view) == len(resumed_view) and all(torch.equal(a, b) for a, b in zip(view, resumed_view))
    if isinstance(opt, H.HyperOptimizer):
        hg, resumed_hg = opt.hypergradients(), resumed.hypergradients()
        assert hg.keys() == resumed_hg.keys() and all(torch.equal(hg[k], resumed_hg[k]) for k in hg)
    # the loaded state mattered: an optimizer started afresh from the same weights ends elsewhere
    assert (flat(model.parameters()) - flat(fresh_model.parameters())).abs().max().item() > 1e-10


@pytest.mark.parametrize("name", cases())
def test_deepcopy_continues_identically(name):
    """copy.deepcopy((model, optimizer)) after a few steps; continuing both gives the same run."""
    data = batches(6)
    model = make_model()
    opt = FACTORY[name](model.parameters())
    train(model, opt, data[:3])
    model_copy, opt_copy = copy.deepcopy((model, opt))
    assert all(p is not q for p, q in zip(model.parameters(), model_copy.parameters()))
    train(model, opt, data[3:])
    train(model_copy, opt_copy, data[3:])
    assert torch.equal(flat(model.parameters()), flat(model_copy.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(hyper_view(opt), hyper_view(opt_copy)))


@pytest.mark.parametrize("name", cases())
def test_closure_step_returns_the_loss(name):
    data = batches(4)
    model, manual_model = make_model(), make_model()
    opt, manual = FACTORY[name](model.parameters()), FACTORY[name](manual_model.parameters())
    returned = []
    for batch in data:
        def closure(batch=batch):
            opt.zero_grad()
            loss = loss_of(model, batch)
            loss.backward()
            return loss
        out = opt.step(closure)
        assert torch.is_tensor(out) and out.dim() == 0 and out.grad_fn is not None
        returned.append(out.item())
    assert returned == train(manual_model, manual, data)
    assert torch.equal(flat(model.parameters()), flat(manual_model.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", cases())
def test_float32_and_float64(name, dtype):
    model = make_model(dtype)
    opt = FACTORY[name](model.parameters())
    data = batches(1, dtype) * 15
    losses = train(model, opt, data)
    final = loss_of(model, data[0]).item()
    assert final < losses[0], f"{name}: {losses[0]} -> {final}"
    buffer_dtype = opt.state_dtype or dtype  # state_dtype: the buffers' own dtype
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
        for key, buf in opt.state[p].items():
            if torch.is_tensor(buf) and key != "step":
                assert buf.dtype == buffer_dtype and torch.isfinite(buf).all(), key
    for v in hyper_view(opt):
        assert v.dtype == dtype and torch.isfinite(v).all()
