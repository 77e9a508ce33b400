"""The fused path (one compiled in-place kernel per tensor) must equal the flat eager path in float64."""
import pytest
import torch
from torch import nn

import optimizers as O

FUSABLE = list(O.RULES)  # every rule, NAdam's scalar buffer included


def _model(seed=0):
    torch.manual_seed(seed)
    # a strided (transposed) parameter exercises the non-contiguous branch
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    return model


def _run(name, fused, steps=8, **kw):
    model = _model()
    extra = {"momentum": 0.9} if name.startswith("sgd") else {}
    if name == "mada":
        extra = dict(beta3=0.3, c=0.4, rho=0.6, gamma=0.7)
    opt = O.RuleOptimizer(model.parameters(), O.get_rule(name), lr=1e-2, weight_decay=0.1, fused=fused, **extra, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt


@pytest.mark.parametrize("name", FUSABLE)
def test_fused_equals_flat_path_in_float64(name):
    slow, slow_opt = _run(name, fused=False)
    fast, fast_opt = _run(name, fused=True)
    assert (slow - fast).abs().max().item() <= 1e-12
    for p_slow, p_fast in zip(slow_opt.state.values(), fast_opt.state.values()):
        for key in p_slow:
            if key != "step":
                assert torch.allclose(p_slow[key], p_fast[key], rtol=0, atol=1e-12), key


def test_fused_handles_lr_schedule_without_recompiling():
    model = _model()
    opt = O.build_optimizer("adamw", model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    twin = _model()
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=1, gamma=0.5)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)

    def one_step():
        for m, o, s in ((model, opt, sched), (twin, ref, ref_sched)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
            s.step()

    one_step()  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new lr or step count must not recompile
        for _ in range(4):
            one_step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_fused_hyper_learning_rejects_scalar_buffers():
    """NAdam's scalar buffer is advanced once per bucket on the fused rule path; the fused
    hyper-learning kernels do not support it (yet) and say so."""
    import hypergrad as H

    with pytest.raises(ValueError, match="scalar buffers"):
        H.HyperOptimizer([nn.Parameter(torch.zeros(3))], "nadam", fused=True, learn=["beta1"])


def test_fused_hyper_learning_equals_the_functional_engine():
    """Compiled per-tensor vjp + double-buffered update == the torch.func engine, float64, depth-2 tower."""
    import hypergrad as H
    from hypergrad.gradcheck import MADA_INTERIOR, builtin_problem

    out = {}
    for fused in (False, True):
        model, loss_fns = builtin_problem(10, seed=3)
        opt = H.HyperOptimizer(model.parameters(), "mada", lr=1e-2, weight_decay=0.1, fused=fused, **MADA_INTERIOR,
                               tower=[H.Level("adam", lr=1e-3, learn=["lr"]), H.Level("sgd", lr=1e-4)])
        for loss_fn in loss_fns:
            opt.zero_grad()
            loss_fn(model).backward()
            opt.step()
        out[fused] = (torch.cat(opt._q), torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                      torch.stack(list(opt.hypergradients().values())))
    for a, b in zip(out[False], out[True]):
        assert (a - b).abs().max().item() <= 1e-10
    assert (out[True][0][:6] - torch.tensor(list(MADA_INTERIOR.values()), dtype=torch.float64)).abs().max() > 1e-4


@pytest.mark.parametrize("rule", ["adan", "adam"])
def test_fused_hyper_buffers_rotate_only_for_a_rule_with_a_gradient_state(rule):
    """A rule with a state that is the gradient (Adan's prev_grad) keeps S + 1 buffers on the fused
    path: the gradient record and that state's buffer trade roles each step. One without it (Adam)
    keeps S + 2: two records, alternating. Both equal the torch.func engine in float64 over 8 steps,
    a state_dict round trip in the middle."""
    import hypergrad as H
    from hypergrad.gradcheck import builtin_problem

    fam = O.get_rule(rule)
    S = len(fam.state_names)
    out = {}
    for fused in (False, True):
        model, loss_fns = builtin_problem(8, seed=5)
        opt = H.HyperOptimizer(model.parameters(), rule, lr=1e-2, weight_decay=0.1, fused=fused)
        for k, loss_fn in enumerate(loss_fns):
            if k == 4:  # a resumed optimizer: the loaded record becomes a buffer of the bucket
                again = H.HyperOptimizer(model.parameters(), rule, lr=1e-2, weight_decay=0.1, fused=fused)
                again.load_state_dict(opt.state_dict())
                opt = again
            opt.zero_grad()
            loss_fn(model).backward()
            opt.step()
            if fused and k >= 1:
                (bucket,) = opt._buckets.values()
                (record,) = opt._records0
                spare = opt._grad_record.get(tuple(map(id, bucket.params)), [])
                kept = {b.untyped_storage().data_ptr() for b in (*bucket.flat.values(), record["g"], *spare)}
                assert len(kept) == (S + 1 if fam.gradient_states else S + 2), k
        out[fused] = (torch.cat([q.reshape(-1) for q in opt._q]),
                      torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert fam.gradient_states == (("prev_grad",) if rule == "adan" else ())
    for a, b in zip(out[False], out[True]):
        assert (a - b).abs().max().item() <= 1e-10


def test_fused_hyper_learning_rejects_unsupported_settings():
    import hypergrad as H

    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="lr"):
        H.MADA(p, fused=True, learn=["lr", "beta1"])
    with pytest.raises(ValueError, match="graph"):
        H.MADA(p, fused=True, backend="graph")


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("point", ["interior", "adam", "lion"])
def test_hoisted_vjp_kernel_equals_plain_vjp_of_displacement(point, native):
    """The compiled vjp kernel (scalar subexpressions hoisted out of the per-element work and chained
    by a 0-D vjp) == ``torch.func.vjp`` of ``displacement`` itself, eager, float64; and so does the
    hand-derived native kernel (``hypergrad.native``) that replaces it for MADA on the CPU."""
    from hypergrad.fused import HyperKernels
    from hypergrad.gradcheck import MADA_INTERIOR
    from optimizers.functional import displacement
    from optimizers.rules import MADA_VERTICES

    family, learn = O.get_rule("mada"), ("beta1", "beta2", "beta3", "c", "rho", "gamma")
    point = {**MADA_INTERIOR, **({} if point == "interior" else MADA_VERTICES[point])}
    f64 = dict(dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    n = 203  # not a multiple of the vector width: the kernel's tail loop too
    g_old, cot = torch.randn(n, generator=gen, **f64), torch.randn(n, generator=gen, **f64)
    state = {name: torch.randn(n, generator=gen, **f64) for name in family.state_names}
    for name in ("v_bar", "v_tilde"):
        state[name] = state[name].abs()
    for name in ("v_bar", "v_tilde", "g_prev"):  # v_hat = 0 there: the sqrt's zero-derivative branch
        state[name][:5] = 0.0
    g_old[:5] = 0.0
    q = torch.tensor([float(point[k]) for k in learn], **f64)
    fixed = {k: torch.tensor(v, **f64) for k, v in
             {"beta1_lion": 0.95, "beta2_lion": 0.98, "eps": 1e-8, "lr": 1e-2, "weight_decay": 0.1}.items()}
    t = torch.tensor(5.0, **f64)

    def delta(qv):
        h = {**fixed, **{k: qv[i] for i, k in enumerate(learn)}}
        return displacement(family, g_old, state, torch.zeros((), **f64), h, t, "decoupled")[0]

    _, vjp = torch.func.vjp(delta, q)
    (expected,) = vjp(cot)
    kern = HyperKernels(family, "decoupled", learn, native=native)
    if native:
        from hypergrad.native import MadaPartial
        assert isinstance(kern.partial_for(fixed, t), MadaPartial)
    partial, cot_sum = kern.partial_hypergradient(g_old, [state[k] for k in family.state_names], cot, q, fixed, t)
    assert expected.abs().max() > 0
    assert (partial - expected).abs().max().item() <= 1e-12 * expected.abs().max().item()
    assert abs(cot_sum.item() - cot.sum().item()) <= 1e-12


def _host_reads(opt) -> int:
    """Host reads of tensor values (``.item()``, ``bool(tensor)``) during one ``opt.step()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    return sum(e.name == "aten::_local_scalar_dense" for e in prof.events())


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("nonfinite,reads", [("ignore", 0), ("skip", 1)])
def test_fused_hyper_step_compiles_fullgraph_without_host_sync(nonfinite, reads, native, monkeypatch):
    """Issue 5: the hyper-learning step runs compiled kernels (fullgraph: a graph break is an error,
    and none is counted) and reads nothing back to the host, except the one documented read of the
    non-finite policy ('skip' checks the gradient sums and hypergradients together). With
    ``native=True`` (the default) the vjp and the rotating update are MADA's hand-written CPU
    kernels (``hypergrad.native``, compiled C) and the first update the traced one."""
    import hypergrad as H
    import hypergrad.native as N
    from hypergrad.gradcheck import builtin_problem
    from torch._dynamo.utils import counters

    if native and not N.mada_kernels_available():
        pytest.skip("no C compiler: the native kernels are not built")
    native_calls = []
    for cls in (N.MadaPartial, N.MadaUpdate):
        run = cls._run
        monkeypatch.setattr(cls, "_run", lambda *a, _run=run, _cls=cls: (native_calls.append(_cls), _run(*a))[1])
    counters.clear()
    model, loss_fns = builtin_problem(5, seed=1)
    opt = H.MADA(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True, nonfinite=nonfinite, native=native)
    fixed = O.build_optimizer("mada", [nn.Parameter(p.detach().clone()) for p in model.parameters()], lr=1e-2,
                              fused=True)
    for loss_fn in loss_fns[:3]:
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
        for p, q in zip(fixed.param_groups[0]["params"], model.parameters()):
            p.grad = q.grad.clone()
        fixed.step()
    opt.zero_grad()
    loss_fns[3](model).backward()
    assert _host_reads(opt) == reads
    assert _host_reads(fixed) == 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    # vjp kernel, hyper update kernel, rule kernel: each one whole traced graph compiled by Inductor
    # (on the CPU directly, without Dynamo: make_fx traces the whole kernel or fails, so no break)
    kernels = [k for hk in opt._hyper_kernels.values() for k in hk._kernels.values()]
    kernels += [k for fk in fixed._kernels.values() for k in fk._kernels.values()]
    assert len(kernels) >= (2 if native else 3) and all(k.compiled_graphs() >= 1 for k in kernels)
    assert all(route == "inductor" for k in kernels for route in k.routes())
    assert set(native_calls) == ({N.MadaPartial, N.MadaUpdate} if native else set())
    before = torch.stack(list(opt.hypergradients().values())).clone()
    opt.zero_grad()
    loss_fns[4](model).backward()
    opt.step()
    assert not torch.equal(before, torch.stack(list(opt.hypergradients().values())))  # it learned


# The eager and the fused engines, float64, after a few hyper-learning steps on builtin_problem(8):
# values of size ~0.1-1 agree to this. The hypergradients are sums with cancellation, each engine adds
# in its own order, and the steps of the coefficients' Adam amplify the last bits (measured: the
# compiled torch.func vjp ended 4.7e-13 from the eager engine, the native MADA kernel 1.4e-12).
ENGINES_AGREE = 1e-11


def test_fused_hyper_state_dict_holds_the_current_state():
    """The fused path keeps each recorded bucket at the state *before* its last update (the next vjp
    advances it); its state_dict must still carry the state after it, equal to the eager engine's
    (float64), and a fused optimizer loaded from it must continue like the eager one."""
    import hypergrad as H
    from hypergrad.gradcheck import MADA_INTERIOR, builtin_problem

    runs = {}
    for fused in (False, True):
        model, loss_fns = builtin_problem(8, seed=4)
        opt = H.HyperOptimizer(model.parameters(), "mada", lr=1e-2, weight_decay=0.1, fused=fused, **MADA_INTERIOR)
        for loss_fn in loss_fns[:5]:
            opt.zero_grad()
            loss_fn(model).backward()
            opt.step()
        runs[fused] = (model, loss_fns, opt, opt.state_dict())
    eager_state, fused_state = runs[False][3]["state"], runs[True][3]["state"]
    assert eager_state.keys() == fused_state.keys()
    for i in eager_state:
        for name in O.get_rule("mada").state_names:
            assert (eager_state[i][name] - fused_state[i][name]).abs().max().item() <= ENGINES_AGREE, (i, name)
    assert fused_state[0]["m"].abs().max().item() > 0  # the comparison is not between zeros
    # Loaded into a fresh fused optimizer (from the eager file): it continues as the eager one does.
    model_e, loss_fns, opt_e, sd = runs[False]
    model_f, _ = builtin_problem(8, seed=4)
    model_f.load_state_dict(model_e.state_dict())
    opt_f = H.HyperOptimizer(model_f.parameters(), "mada", lr=1e-2, weight_decay=0.1, fused=True, **MADA_INTERIOR)
    opt_f.load_state_dict(sd)
    for model, opt in ((model_e, opt_e), (model_f, opt_f)):
        for loss_fn in loss_fns[5:]:
            opt.zero_grad()
            loss_fn(model).backward()
            opt.step()
    for a, b in zip(model_e.parameters(), model_f.parameters()):
        assert (a - b).abs().max().item() <= ENGINES_AGREE
    assert (torch.cat(opt_e._q) - torch.cat(opt_f._q)).abs().max().item() <= ENGINES_AGREE


def test_fused_hyper_opt_state_reads_the_current_state():
    """``opt.state[p]`` on the fused path reads the current state, as on the eager path, although the
    recorded buckets' buffers lag one update behind (float64, equal to the eager engine's to ENGINES_AGREE);
    the read does not disturb the run; a parameter that misses a step shows the same state before and
    after it; pickled or deep-copied, the state holds the current values."""
    import copy
    import pickle

    import hypergrad as H
    from hypergrad.gradcheck import MADA_INTERIOR, builtin_problem

    names = O.get_rule("mada").state_names
    runs = {}
    for fused in (False, True):
        model, loss_fns = builtin_problem(8, seed=4)
        opt = H.HyperOptimizer(model.parameters(), "mada", lr=1e-2, weight_decay=0.1, fused=fused, **MADA_INTERIOR)
        params = list(model.parameters())
        for i, loss_fn in enumerate(loss_fns[:6]):
            opt.zero_grad()
            loss_fn(model).backward()
            if i == 4:  # the last parameter misses this step: its state must read the same before and after
                params[-1].grad = None
                before = {n: opt.state[params[-1]][n].clone() for n in names}
            opt.step()
            if i == 4:
                for n in names:
                    assert torch.equal(opt.state[params[-1]][n], before[n]), (fused, n)
        runs[fused] = (params, opt)
    (p_e, opt_e), (p_f, opt_f) = runs[False], runs[True]
    assert opt_f._records0 is not None and type(opt_f.state[p_f[0]]).__name__ == "_ParamState"
    for a, b in zip(p_e, p_f):
        for n in names:
            assert (opt_e.state[a][n] - opt_f.state[b][n]).abs().max().item() <= ENGINES_AGREE, n
            assert (dict(opt_e.state[a].items())[n] - opt_f.state[b].get(n)).abs().max().item() <= ENGINES_AGREE, n
        assert opt_f.state[b]["step"] == opt_e.state[a]["step"]
    assert opt_f.state[p_f[0]]["m"].abs().max().item() > 0
    sd = opt_f.state_dict()["state"]
    for i, b in enumerate(p_f):
        for n in names:
            assert torch.equal(sd[i][n], opt_f.state[b][n]), n
    for clone in (copy.deepcopy(opt_f), pickle.loads(pickle.dumps(opt_f))):
        for b in clone.param_groups[0]["params"]:
            assert type(clone.state[b]) is dict
        for a, b in zip(p_e, clone.param_groups[0]["params"]):
            assert (opt_e.state[a]["m"] - clone.state[b]["m"]).abs().max().item() <= ENGINES_AGREE


@pytest.mark.parametrize("record,lagging,rotate", [(True, True, False), (True, True, True), (True, False, False),
                                                   (False, True, False), (False, False, False)])
def test_fused_hyper_update_kernel_equals_its_eager_definition(record, lagging, rotate):
    """Each variant of the compiled hyper update kernel (advance the buffers past the recorded
    update or not; leave them before this update and store the gradient, or not; store it in
    g_prev's buffer, rotating) equals the eager function it is traced from, in float64.
    Regression: a kernel that wrote the gradient buffer it also copied into MADA's g_prev gave
    g_prev the new gradient once compiled."""
    import hypergrad.fused as HF

    fam = O.get_rule("mada")
    names = fam.state_names
    kern = HF.HyperKernels(fam, "decoupled", ["beta1", "beta2", "beta3", "c", "rho", "gamma"])
    gen = torch.Generator().manual_seed(0)
    n = 203  # not a multiple of the vector width: the loop's tail runs too

    def rand(positive=False):
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        return v.abs() if positive else v

    h = {name: torch.tensor(v, dtype=torch.float64) for name, v in
         dict(beta1=0.8, beta2=0.95, beta3=0.3, c=0.6, rho=0.4, gamma=0.7, beta1_lion=0.95, beta2_lion=0.98,
              eps=1e-8, lr=1e-2, weight_decay=0.1).items()}
    t, t_last = torch.tensor(4.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    pre, pre_last = kern.scalars(h, t), kern.scalars(h, t_last)
    x, g, g_last = rand(), rand(), rand()
    states = [rand(positive=name.startswith("v")) for name in names]
    last = (h, t_last, pre_last) if lagging else None
    outs = []
    for compiled in (True, False):
        xs, ss = x.clone(), [s.clone() for s in states]
        g_store = torch.zeros(n, dtype=torch.float64) if record and not rotate else None
        gl = g_last.clone() if lagging else None
        if compiled:
            kern.update(xs, g.clone(), ss, gl, g_store, h, t, pre, last, rotate=rotate)
        else:
            HF._update(fam, "decoupled", names, xs, g.clone(), ss, gl, g_store, h, t, pre, last,
                       "g_prev" if rotate else None)
        outs.append([xs, *ss] + ([g_store] if g_store is not None else []))
    for a, b in zip(*outs):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max().item() <= 1e-12
    i = 1 + names.index("g_prev")
    if record and lagging and not rotate:  # the advanced g_prev is the recorded gradient, not the new one
        assert torch.equal(outs[0][i], g_last)
    if rotate:  # g_prev's buffer holds the new record; the other buffers the advanced state, as without rotating
        assert torch.equal(outs[0][i], g)
        xs, ss, g_store = x.clone(), [s.clone() for s in states], torch.zeros(n, dtype=torch.float64)
        kern.update(xs, g.clone(), ss, g_last.clone(), g_store, h, t, pre, last)
        assert torch.equal(xs, outs[0][0]) and torch.equal(g_store, g)
        assert all(torch.equal(a, b) for k, (a, b) in enumerate(zip(ss, outs[0][1:])) if k != i - 1)
    with pytest.raises(ValueError, match="rotate needs record=True"):
        kern.update_for(h, t, pre, None, True, rotate=True)


def test_fused_hyper_learning_with_missing_gradients_equals_the_functional_engine():
    """Parameters without a gradient at some steps: the fused path re-buckets, advances a recorded
    bucket that does not step (its state is kept before the recorded update), and still follows the
    torch.func engine (float64), state_dict included."""
    import hypergrad as H
    from hypergrad.gradcheck import MADA_INTERIOR, builtin_problem

    runs = {}
    for fused in (False, True):
        model, loss_fns = builtin_problem(8, seed=3)
        opt = H.HyperOptimizer(model.parameters(), "mada", lr=1e-2, weight_decay=0.1, fused=fused, **MADA_INTERIOR)
        for k, loss_fn in enumerate(loss_fns):
            opt.zero_grad()
            loss_fn(model).backward()
            if k in (2, 3):
                model.fc1.weight.grad = None
            if k == 5:
                model.head.bias.grad = None
            opt.step()
        runs[fused] = (torch.cat(opt._q), torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                       opt.state_dict()["state"])
    assert (runs[False][0] - runs[True][0]).abs().max().item() <= 1e-10
    assert (runs[False][1] - runs[True][1]).abs().max().item() <= 1e-10
    eager, fast = runs[False][2], runs[True][2]
    assert {i: int(s["step"]) for i, s in eager.items()} == {i: int(s["step"]) for i, s in fast.items()}
    assert int(fast[0]["step"]) == 6 and int(fast[5]["step"]) == 7  # the skipped parameters did not step
    for i in eager:
        for name in O.get_rule("mada").state_names:
            assert (eager[i][name] - fast[i][name]).abs().max().item() <= 1e-10


@pytest.mark.parametrize("config", ["share_tensor", "share_group", "l2", "warmup", "interval", "strided"])
def test_fused_hyper_learning_settings_equal_the_functional_engine(config):
    """The fused path against the torch.func engine (float64, 8 steps) across the settings that
    change its bookkeeping: per-tensor and per-group coefficients (packed runs must not mix
    coefficient sets), L2 weight decay (the record holds the effective gradient), a warm-up (no
    records at first), learning every third step after a warm-up (records come and go: a recorded
    update, an update that advances past it without recording, plain updates), and a strided
    (non-contiguous) parameter."""
    import hypergrad as H
    from hypergrad.gradcheck import MADA_INTERIOR, builtin_problem

    out = {}
    for fused in (False, True):
        model, loss_fns = builtin_problem(8, seed=7)
        if config == "strided":  # a parameter that is a transposed view of its storage
            model.fc2.weight = nn.Parameter(model.fc2.weight.detach().t().contiguous().t())
            assert not model.fc2.weight.is_contiguous()
        kw = dict(lr=1e-2, weight_decay=0.1, fused=fused, **MADA_INTERIOR)
        params = list(model.parameters())
        if config == "share_tensor":
            opt = H.HyperOptimizer(params, "mada", share="tensor", **kw)
        elif config == "share_group":
            opt = H.HyperOptimizer([{"params": params[:3]}, {"params": params[3:], "lr": 5e-3, "weight_decay": 0.0}],
                                   "mada", share="group", **kw)
        elif config == "l2":
            opt = H.HyperOptimizer(params, "mada", weight_decay_mode="l2", **kw)
        elif config == "warmup":
            opt = H.HyperOptimizer(params, "mada", warmup=3, **kw)
        elif config == "interval":  # records at steps 2 and 5, hyper-steps at 3 and 6
            opt = H.HyperOptimizer(params, "mada", warmup=2, hyper_interval=3, **kw)
        else:
            opt = H.HyperOptimizer(params, "mada", **kw)
        for loss_fn in loss_fns:
            opt.zero_grad()
            loss_fn(model).backward()
            opt.step()
        out[fused] = (torch.cat([q.reshape(-1) for q in opt._q]),
                      torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    for a, b in zip(out[False], out[True]):
        assert (a - b).abs().max().item() <= 1e-10
    q0 = torch.tensor(list(MADA_INTERIOR.values()), dtype=torch.float64)
    assert (out[True][0][:6] - q0).abs().max().item() > 1e-5  # the coefficients moved


def test_tensor_kernel_direct_route_equals_eager_and_dynamo():
    """``TensorKernel`` compiles on the CPU straight through Inductor, without Dynamo's guards: the
    guards its compilation assumed are checked once per argument layout instead. Sizes 1 and 2
    (not specialized), reductions on either side of Inductor's 4096-element chunk, views at storage
    offsets 0, 1 and more: the in-place writes must equal eager and the Dynamo route bit for bit,
    the reductions eager's to float32 round-off; arguments its guards reject are never run by it."""
    from optimizers.compiled import TensorKernel

    def fn(a, b, s):
        b.add_(a * s)
        return (a * b).sum(), a.sum()

    direct, dynamo = TensorKernel(fn, "t_direct", route="inductor"), TensorKernel(fn, "t_dynamo", route="dynamo")
    s = torch.tensor(0.5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for n, off in ((5000, 7), (3, 0), (1, 0), (100, 1), (10000, 0), (4096, 3), (2, 2), (5000, 0)):
        buf = torch.randn(3 * n + 7, generator=gen)
        a, b = buf[off:off + n], torch.randn(n, generator=gen)
        b1, b2, b3 = b.clone(), b.clone(), b.clone()
        out1, out2, out3 = direct(a, b1, s), dynamo(a, b2, s), fn(a, b3, s)
        assert torch.equal(b1, b3) and torch.equal(b2, b3), (n, off)
        for x, y in zip(out1, out3):
            assert abs(x.item() - y.item()) <= 1e-5 * (1 + a.abs().sum().item() * (1 + b.abs().max().item())), (n, off)
        assert torch.equal(buf[off:off + n], a)  # read-only argument untouched
    assert direct.routes() == ["inductor"] and dynamo.routes() == ["dynamo"]
    again = direct.compiled_graphs()
    direct(torch.randn(777), torch.randn(777), s)  # a layout its variants already cover: no compilation
    assert direct.compiled_graphs() == again
    # The compiled code assumes equal sizes (a guard); unequal ones must not run it (reading out of
    # bounds) but fail, as eager does.
    with pytest.raises(Exception, match="size"):
        direct(torch.randn(300), torch.randn(200), s)
    with pytest.raises(ValueError, match="route"):
        TensorKernel(fn, "bad", route="fast")


@pytest.mark.parametrize("name", sorted(O.RULES))
def test_scalar_numbers_equal_scalar_values(name):
    """The fused rule step's per-step scalars in Python floats (``Family.scalar_numbers``) == the
    float64 0-D tensor evaluation (``scalar_values``), at the defaults and at a step > 1; ``None``
    (the caller falls back to tensors) for a tensor hyperparameter or a value floats would not
    evaluate as torch does (sqrt of a negative, a NaN)."""
    family = O.get_rule(name)
    h = {n: float(c.init) for n, c in family.coefficients.items() if not isinstance(c.init, tuple)}
    h.update(lr=1e-3, weight_decay=0.1)
    if len(h) < len(family.coefficients) + 2:
        pytest.skip("a simplex coefficient: not a plain number")
    for t in (1.0, 7.0):
        numbers = family.scalar_numbers(h, t)
        tensors = family.scalar_values({k: torch.tensor(v, dtype=torch.float64) for k, v in h.items()},
                                       torch.tensor(t, dtype=torch.float64))
        assert numbers is not None and set(numbers) == set(tensors)
        for uid, v in tensors.items():
            v = float(v)
            assert isinstance(numbers[uid], float) and abs(numbers[uid] - v) <= 1e-15 * max(1.0, abs(v)), (uid, t)
    if tensors:
        assert family.scalar_numbers({k: torch.tensor(v, dtype=torch.float64) for k, v in h.items()}, 7.0) is None
        assert family.scalar_numbers(h, float("nan")) is None


def test_fused_rule_step_with_a_tensor_lr_reads_nothing_back_to_the_host(monkeypatch):
    """Plain-number hyperparameters take the float path; a tensor one (an LR scheduler's, on a GPU)
    must not be read back with ``float()``: the update reads nothing back to the host (the per-step
    check of the groups' domains, which reads a tensor lr, is left out here), and equals the same
    step with the number."""
    model, twin = _model(), _model()
    opts = [O.build_optimizer("mada", m.parameters(), lr=lr, weight_decay=0.1, fused=True)
            for m, lr in ((model, torch.tensor(1e-2, dtype=torch.float64)), (twin, 1e-2))]
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    for m, opt in zip((model, twin), opts):
        for step in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            if step == 2 and m is model:
                monkeypatch.setattr(opt, "_validate_all_groups", lambda: None)
                assert _host_reads(opt) == 0
            else:
                opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("hyper", [False, True])
def test_fused_kernels_run_bare_and_bump_the_version_of_what_they_write(hyper):
    """The direct route calls Inductor's compiled code without AOTAutograd's wrappers (~110 us a call
    with cold caches): every kernel of a fused MADA step (rule, or hyper-learning vjp and update)
    is called so, and a parameter it writes gets its version counter bumped as an in-place
    operation does, so autograd still rejects a backward through a parameter stepped since. (The
    parameter is above ``SMALL_TENSOR``: written by its own kernel call, not copied back from a
    packed run.)"""
    import hypergrad as H
    from optimizers.compiled import SMALL_TENSOR, TensorKernel

    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(SMALL_TENSOR + 5, generator=gen, dtype=torch.float64))
    target = torch.randn(SMALL_TENSOR + 5, generator=gen, dtype=torch.float64)
    opt = H.MADA([w], lr=1e-2, fused=True) if hyper else O.build_optimizer("mada", [w], lr=1e-2, fused=True)
    for _ in range(3):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        before = w._version
        opt.step()
        assert w._version > before
    kernels = list(opt._hyper_kernels["decoupled"]._kernels.values() if hyper
                   else opt._kernels["decoupled"]._kernels.values())
    assert kernels and all(isinstance(k, TensorKernel) for k in kernels)
    assert all(k.bare_calls() and all(k.bare_calls()) for k in kernels), [(k.name, k.bare_calls()) for k in kernels]
    opt.zero_grad()
    loss = (w * w).sum()  # saves w for its backward
    (w * 1.0).sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bound_kernel_takes_numbers_as_float64_scalars():
    """``kern.bind(0.5, ..., device=...)``: numbers stand for float64 0-D tensors (one vector made at
    once): the same compiled graph and bit-for-bit the same writes as with tensors, mixed or not."""
    from optimizers.compiled import TensorKernel

    def fn(a, b, s, u):
        b.add_(a * s - u)

    kern = TensorKernel(fn, "t_numbers")
    f64 = dict(dtype=torch.float64)
    a = torch.randn(300, generator=torch.Generator().manual_seed(0))
    outs = []
    for scalars in ((torch.tensor(0.3, **f64), torch.tensor(0.7, **f64)), (0.3, 0.7), (0.3, torch.tensor(0.7, **f64))):
        b = torch.zeros(300)
        kern.bind(*scalars, device=torch.device("cpu"))(a, b)
        outs.append(b)
    assert all(torch.equal(o, outs[0]) for o in outs) and outs[0].abs().sum() > 0
    assert kern.compiled_graphs() == 1
    with pytest.raises(TypeError, match="device"):
        kern.bind(0.3, 0.7)
    with pytest.raises(TypeError, match="int or float"):
        kern.bind(True, 0.7, device=torch.device("cpu"))


def test_bare_calls_equal_eager_for_views_and_partial_writes():
    """Called bare (without AOTAutograd's wrappers), a kernel that returns a view of an input or
    writes a slice of one still equals eager: the writes land, the view reads the input's memory,
    and the written input's version counter moves."""
    from optimizers.compiled import TensorKernel

    def view_out(a, b, s):
        b.add_(a * s)
        return a[1:3], (a * b).sum()

    def write_slice(a, b, s):
        b[:2].mul_(s)
        return a.sum()

    s = torch.tensor(0.5, dtype=torch.float64)
    for fn in (view_out, write_slice):
        kern = TensorKernel(fn, f"t_{fn.__name__}")
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
        b1, b2 = b.clone(), b.clone()
        version = b1._version
        out1, out2 = kern(a, b1, s), fn(a, b2, s)
        assert kern.bare_calls() == [True], fn.__name__
        assert torch.equal(b1, b2) and b1._version > version
        for x, y in zip(out1 if isinstance(out1, tuple) else (out1,), out2 if isinstance(out2, tuple) else (out2,)):
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-6)
        if fn is view_out:
            assert out1[0].data_ptr() == a[1:3].data_ptr()


def test_tensor_kernel_falls_back_to_dynamo_when_the_direct_route_fails(monkeypatch, caplog):
    """The direct route uses private torch APIs: if it fails to compile, the kernel says so (a logged
    warning) and runs through torch.compile instead, with the same results."""
    import logging

    import optimizers.compiled as C

    def fn(a, b, s):
        b.add_(a * s)
        return (a * b).sum(), a.sum()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated Inductor API change")

    monkeypatch.setattr(C, "_compile_direct", broken)
    kern = C.TensorKernel(fn, "t_fallback")
    a, b = torch.randn(300), torch.randn(300)
    b_ref = b.clone()
    with caplog.at_level(logging.WARNING, logger="optimizers.compiled"):
        out = kern(a, b, torch.tensor(0.5, dtype=torch.float64))
    expected = fn(a, b_ref, torch.tensor(0.5, dtype=torch.float64))
    assert kern.routes() == ["dynamo"] and "simulated Inductor API change" in caplog.text
    assert torch.equal(b, b_ref)
    assert all(abs(x.item() - y.item()) <= 1e-4 for x, y in zip(out, expected))


def _fx_cache_counts():
    from torch._dynamo.utils import counters
    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def test_compilations_are_cached_per_layout_and_cuda_ones_per_size_class(monkeypatch):
    """Inductor's cache keeps no guard on our symbolic sizes, yet its code depends on the size it was
    compiled for (on CUDA a reduction's split): a compilation for another layout must not be served
    the cached code of the first (``_LayoutKey``), while the same layout again is. A CUDA
    compilation serves sizes within a factor of 4 (``_guard_size_class``; tried here on the CPU)."""
    import contextlib

    import optimizers.compiled as C
    from torch._inductor.utils import fresh_cache

    monkeypatch.setattr(C, "SIZE_CLASS_DEVICES", ("cuda", "cpu"))

    def fn(a, b):
        return (a * b).sum()

    def run(kern, n):
        a = torch.randn(n, dtype=torch.float64)
        torch.testing.assert_close(kern(a, a), (a * a).sum())

    with fresh_cache():
        hits, misses = _fx_cache_counts()
        kern = C.TensorKernel(fn, "t_layout_key")
        for n in (100, 255):  # one class: [64, 256)
            run(kern, n)
        assert kern.compiled_graphs() == 1
        run(kern, 256)  # the next class: a compilation of its own, not the cached one
        assert kern.compiled_graphs() == 2 and _fx_cache_counts() == (hits, misses + 2)
        run(C.TensorKernel(fn, "t_layout_key"), 100)  # the first layout again: from the cache
        assert _fx_cache_counts() == (hits + 1, misses + 2)
    # without the layout in the key, the second class would have been served the first one's code
    monkeypatch.setattr(C, "_cache_keyed_by_layout", lambda args: contextlib.nullcontext())
    with fresh_cache():
        hits, misses = _fx_cache_counts()
        kern = C.TensorKernel(fn, "t_layout_key")
        run(kern, 100)
        run(kern, 256)
        assert kern.compiled_graphs() == 2 and _fx_cache_counts() == (hits + 1, misses + 1)


_PREFETCH_SOURCE = """#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const double* in_ptr0,
                       const float* in_ptr1,
                       const float* in_ptr2,
                       const double* in_ptr3,
                       float* out_ptr0,
                       double* out_ptr1,
                       const int64_t ks0)
{
    {
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(16L))
        {
            {
                if(C10_LIKELY(x0 < ks0))
                {
                    auto tmp0 = in_ptr0[static_cast<int64_t>(2L)];
                    auto tmp1 = at::vec::Vectorized<float>::loadu(in_ptr1 + static_cast<int64_t>(x0), static_cast<int64_t>(16));
                    auto tmp2 = at::vec::Vectorized<float>::loadu(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(16));
                    auto tmp3 = at::vec::Vectorized<float>::loadu(in_ptr2 + static_cast<int64_t>(2L*x0), static_cast<int64_t>(16));
                    auto tmp4 = [&]() { return tmp1 + tmp2 + tmp3; }();
                    tmp4.store(out_ptr0 + static_cast<int64_t>(x0));
                }
            }
        }
    }
    {
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(16L))
        {
            auto tmp0 = at::vec::VectorizedN<double,2>::loadu(in_ptr3 + static_cast<int64_t>(x0), static_cast<int64_t>(16));
            tmp0.store(out_ptr1 + static_cast<int64_t>(x0), static_cast<int64_t>(16));
        }
    }
    {
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(1L))
        {
            out_ptr1[static_cast<int64_t>(x0)] = in_ptr3[static_cast<int64_t>(x0)];
        }
    }
}
"""


def test_add_prefetch_hints_every_contiguous_stream_of_the_vectorized_loops():
    """``add_prefetch`` (the software prefetch of ``optimizers.prefetch``) adds one hint per buffer
    and cache line to each vectorized loop, for the buffers it loads or stores at the loop index only
    (a strided read, a scalar loop and scalar arguments get none); stores are prefetched for writing.
    A source of another shape comes back unchanged."""
    from optimizers.prefetch import add_prefetch

    new, streams = add_prefetch(_PREFETCH_SOURCE, distance=1024)
    hints = [line.strip() for line in new.splitlines() if line.strip().startswith("HYPERGRAD_PREFETCH(")]
    assert hints == ["HYPERGRAD_PREFETCH(in_ptr1 + x0 + 256, 0);", "HYPERGRAD_PREFETCH(out_ptr0 + x0 + 256, 1);",
                     # 16 doubles a step: two cache lines
                     "HYPERGRAD_PREFETCH(in_ptr3 + x0 + 128, 0);", "HYPERGRAD_PREFETCH(in_ptr3 + x0 + 136, 0);",
                     "HYPERGRAD_PREFETCH(out_ptr1 + x0 + 128, 1);", "HYPERGRAD_PREFETCH(out_ptr1 + x0 + 136, 1);"]
    assert streams == 4 and "#define HYPERGRAD_PREFETCH" in new
    # the hints open the loop bodies; nothing else changed
    assert "\n".join(line for line in new.splitlines() if "HYPERGRAD_PREFETCH" not in line and not line.startswith(
        ("#if", "#else", "#endif"))) == _PREFETCH_SOURCE.rstrip("\n")
    assert add_prefetch("int f() { return 0; }") == ("int f() { return 0; }", 0)
    with pytest.raises(ValueError, match="distance"):
        add_prefetch(_PREFETCH_SOURCE, distance=0)


def _run_fresh(code: str) -> str:
    """``code`` run by a fresh interpreter in the repository root (one that has not loaded any compiled
    kernel yet: a process that has reuses it without compiling its source); its stdout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


_HINTED_CASE = """
import torch
from optimizers.compiled import TensorKernel

def fn(x, g, m, v, s):  # a unique constant: no compiled code of an earlier test is reused
    m.mul_(0.8125).add_(g * 0.1875)
    v.mul_(0.96875).add_(g * g * 0.03125)
    x.add_(m / (v.sqrt() + 1e-8) * s)

kern = TensorKernel(fn, "t_prefetch")
gen = torch.Generator().manual_seed(0)
args = [torch.randn(10007, generator=gen), torch.randn(10007, generator=gen), torch.randn(10007, generator=gen),
        torch.rand(10007, generator=gen)]
expected = [a.clone() for a in args]
s = torch.tensor(-1e-3, dtype=torch.float64)
kern(*args, s)
fn(*expected, s)
"""


def test_prefetching_kernels_are_compiled_with_hints_and_equal_eager(tmp_path):
    """Every direct-route kernel is compiled with the prefetch hints (one per buffer it streams),
    which change no value: its in-place writes equal, bit for bit, those of the same kernel compiled
    without them (in a fresh process, where ``add_prefetch`` is switched off: one that has loaded the
    compiled code reuses it), and eager's to rounding (compiled code may fuse a multiply and an add
    that eager rounds apart: 1 ulp in 10 of 10007 elements on an AMD EPYC Zen 4, none on a Xeon)."""
    hinted = {}
    exec(_HINTED_CASE, hinted)
    assert hinted["kern"].prefetched_streams() == [[4]]  # x, g, m, v
    for a, b in zip(hinted["args"], hinted["expected"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    out_file = tmp_path / "unhinted.pt"
    _run_fresh("import optimizers.prefetch as prefetch\n"
               "prefetch.add_prefetch = lambda source, distance=prefetch.PREFETCH_BYTES: (source, 0)\n"
               + _HINTED_CASE + f"\nassert kern.prefetched_streams() == [[0]]\ntorch.save(args, {str(out_file)!r})\n")
    unhinted = torch.load(out_file)
    assert all(torch.equal(a, b) for a, b in zip(hinted["args"], unhinted))


@pytest.mark.parametrize("hyper", [False, True])
def test_fused_step_follows_a_parameter_whose_storage_or_layout_changes(hyper):
    """The fused kernels keep each bucket's views from step to step (``SegmentPlan``). A parameter
    given a new storage (``p.data = ...``) or made strided between steps must be updated where it
    now lives, exactly as the default path does (float64, both the fixed and the hyper-learning path)."""
    import hypergrad as H

    out = []
    for fused in (False, True):
        model = _model()
        params = list(model.parameters())
        if hyper:
            opt = H.HyperOptimizer(params, "mada", lr=1e-2, weight_decay=0.1, fused=fused, beta3=0.3, c=0.4,
                                   gamma=0.7)
        else:
            opt = O.RuleOptimizer(params, "mada", lr=1e-2, weight_decay=0.1, fused=fused, beta3=0.3, c=0.4, gamma=0.7)
        g = torch.Generator().manual_seed(1)
        for step in range(8):
            if step == 3:  # a new storage for a matrix, the old one left behind
                model[0].weight.data = model[0].weight.data.clone()
            if step == 5:  # the same values, now strided (a transposed view of a new storage)
                model[2].weight.data = model[2].weight.data.t().contiguous().t()
            x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g,
                                                                                     dtype=torch.float64)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert not model[2].weight.is_contiguous()
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert (out[0] - out[1]).abs().max().item() <= 1e-12
    assert (out[1] - torch.cat([p.detach().reshape(-1) for p in _model().parameters()])).abs().min() > 0


def test_segment_plan_keeps_views_while_buffers_are_the_same():
    """``SegmentPlan.views`` makes a buffer's slices once and returns the same tensors while the buffer
    is the same object; a new buffer gets its own; a parameter made strided changes the views' shape."""
    from optimizers.compiled import SegmentPlan

    params = [torch.zeros(4, 3), torch.zeros(5), torch.zeros(2, 2).t()]
    plan = SegmentPlan(params, small=8)  # 12 elements: a call of its own; 5 and 4: packable, but a strided one
    assert [(off, n, idxs) for off, n, idxs in plan.segments] == [(0, 12, [0]), (12, 5, [1]), (17, 4, [2])]
    buf, other = torch.arange(21.0), torch.arange(21.0)
    plan.check(params)
    first = plan.views(buf)
    assert [tuple(v.shape) for v in first] == [(12,), (5,), (2, 2)]
    assert all(a is b for a, b in zip(first, plan.views(buf)))
    assert not any(a is b for a, b in zip(first, plan.views(other)))
    params[0] = torch.zeros(3, 4).t()  # now strided: runs in its own shape
    plan.check(params)
    assert [tuple(v.shape) for v in plan.views(buf)] == [(4, 3), (5,), (2, 2)]
    x, g, _ = plan.tensors(0, params, [torch.ones(4, 3)] * 3)
    assert x is params[0] and g.is_contiguous()


_PREFETCH_PROBE = """
import json, torch, hypergrad, optimizers
x, y = torch.zeros(4096, requires_grad=True), torch.zeros(4096, requires_grad=True)
rule = optimizers.RuleOptimizer([x], "mada", lr=1e-3, weight_decay=0.1, fused=True)
hyper = hypergrad.HyperOptimizer([y], "mada", lr=1e-3, weight_decay=0.1, fused=True, native=False)
for step in range(3):
    for p, opt in ((x, rule), (y, hyper)):
        p.grad = torch.full_like(p, 0.01 * (step + 1))
        opt.step()
kernels = [k for fk in rule._kernels.values() for k in fk._kernels.values()]
kernels += [k for hk in hyper._hyper_kernels.values() for k in hk._kernels.values()]
streams = {}
for k in kernels:
    streams.setdefault(k.name, []).extend(k.prefetched_streams())
print(json.dumps(streams))
"""


def test_the_mada_kernels_prefetch_every_buffer_they_stream():
    """On the pinned torch, Inductor's loops for MADA's kernels have the shape ``add_prefetch``
    parses: the fixed update prefetches its 8 streams (x, g, 6 buffers); the vjp kernel (compiled where
    the native MADA kernel is not used: ``native=False`` here) its 8 (the
    recorded gradient, 6 buffers, the new gradient) and the small loop that writes its result; the
    first recording update 9 (x, g, 6 buffers, the gradient record), the later ones 9 too (x, g, 6
    buffers and the last record, read to advance the buffers; the new record goes to g_prev's
    buffer, which is among the 6: ``hypergrad.fused._update``'s rotate). A torch whose code generation changes fails here instead
    of silently losing the hints. (A fresh process: one that has loaded the same compiled code
    already reuses it without compiling its source.)"""
    import json

    streams = json.loads(_run_fresh(_PREFETCH_PROBE).strip().splitlines()[-1])
    assert streams["fused_mada_decoupled"] == [[8]]
    assert streams["hyper_partial_mada_decoupled"] == [[9]]
    assert sorted(streams["hyper_update_mada_decoupled"]) == [[9], [9]]


# ----------------------------------------------------------------------- buffer placement (flat_buffer)
def _page_offset(t):
    return t.data_ptr() % 4096


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_flat_buffers_start_at_distinct_page_offsets(dtype):
    """On a CPU, buffer k of a bucket starts k * STAGGER_BYTES past the allocator's 64 bytes in its page,
    so no two of a fused loop's streams share a page offset (4K aliasing); values as asked."""
    from optimizers.functional import STAGGER_BYTES, flat_buffer
    n = 600_000  # >= STAGGER_MIN_BYTES in every dtype here
    bufs = [flat_buffer(n, dtype, torch.device("cpu"), slot, fill=float(slot)) for slot in range(1, 17)]
    offsets = [_page_offset(b) for b in bufs]
    assert offsets == [(64 + k * STAGGER_BYTES) % 4096 for k in range(1, 17)]
    assert len(set(offsets)) == 16
    for slot, b in enumerate(bufs, start=1):
        assert b.shape == (n,) and b.dtype == dtype and b.is_contiguous() and bool((b == slot).all())
    # small (streamed from cache; a page of padding would matter), or slot 0: a plain allocation
    assert flat_buffer(1000, dtype, torch.device("cpu"), 3).untyped_storage().nbytes() == 1000 * b.element_size()
    assert flat_buffer(n, dtype, torch.device("cpu"), 0).storage_offset() == 0


def test_free_slot_places_a_new_buffer_apart_from_the_others():
    """``free_slot``: the first slot from ``first`` on whose page offset no given buffer starts at
    (on the fused hyper path buffers trade roles, so a slot no longer follows a name)."""
    from optimizers.functional import flat_buffer, free_slot

    n, cpu = (1 << 20) // 4, torch.device("cpu")  # 1 MiB of float32: staggered
    held = [flat_buffer(n, torch.float32, cpu, k) for k in (1, 2, 4)]
    assert free_slot(held, 1) == 3 and free_slot(held, 4) == 5 and free_slot([], 7) == 7
    new = flat_buffer(n, torch.float32, cpu, free_slot(held, 1))
    assert len({_page_offset(b) for b in held + [new]}) == 4


def test_fused_hyper_buffers_are_staggered_and_survive_a_reload():
    import hypergrad as H
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.Tanh(), nn.Linear(1024, 512))  # 4 MiB buffers: staggered
    opt = H.MADA(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)

    def offsets(o):  # of the S + 1 buffers: the state and the gradient record (they trade roles each step)
        bucket = next(iter(o._buckets.values()))
        flat = [b for b in bucket.flat.values() if b.dim()]
        (record,) = o._records0
        assert not any(o._grad_record.values())  # no spare buffer: the record rotates into g_prev's
        return [_page_offset(b) for b in flat + [record["g"]]]

    def train(o, steps):
        for _ in range(steps):
            o.zero_grad()
            model(torch.randn(8, 512)).pow(2).mean().backward()
            o.step()

    train(opt, 3)
    assert len(set(offsets(opt))) == len(O.get_rule("mada").state_names) + 1  # 6 states, 1 gradient record
    again = H.MADA(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    again.load_state_dict(opt.state_dict())
    train(again, 2)  # the loaded records' buffers became the buckets' ones
    assert len(set(offsets(again))) == len(O.get_rule("mada").state_names) + 1


def test_device_tensor_converts_numbers_lists_and_tensors():
    """The scalars of a fused step (``device_tensor``, ``device_scalar``): the values asked for, as float64
    0-D tensors detached from any graph. (On CUDA they are staged through pinned memory: tests/test_cuda.py
    checks that the step then never waits for the device.)"""
    from optimizers.functional import device_scalar, device_tensor

    assert torch.equal(device_tensor([1.5, 2], torch.float64, "cpu"), torch.tensor([1.5, 2.0], dtype=torch.float64))
    s = device_scalar(torch.tensor(3.0, requires_grad=True), torch.device("cpu"))
    assert s.dtype == torch.float64 and s.shape == () and not s.requires_grad and s.item() == 3.0
    assert device_scalar(torch.tensor([2.5]), "cpu").shape == () and device_scalar(7, "cpu").item() == 7.0
