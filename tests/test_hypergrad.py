"""The hyper-gradient engine against its oracles.

Oracles: central finite differences through the last update (``hypergrad.gradcheck``), the closed
forms of Baydin et al. (SGD-HD: dF_t/dlr = -g_t . g_{t-1}; Adam-HD: -g_t . u_{t-1}), torch.optim
running in lockstep, the two backends against each other, and towers against shorter towers.
"""
import copy
import math

import pytest
import torch
from torch import nn

import hypergrad as H
import optimizers as O
from hypergrad.gradcheck import MADA_INTERIOR, builtin_problem, check_hypergradients, check_tower_hypergradients

MADA_COEFS = ("beta1", "beta2", "beta3", "c", "rho", "gamma")


def _losses(model_batches):
    return [lambda m, x=x, y=y: nn.functional.mse_loss(m(x), y) for x, y in model_batches]


# --------------------------------------------------------------------------- finite differences
@pytest.mark.parametrize("point", ["interior", *O.MADA_VERTICES])
def test_mada_hypergradients_match_finite_differences(point):
    coefficients = dict(MADA_INTERIOR)
    if point != "interior":
        coefficients.update(O.MADA_VERTICES[point])
    model, loss_fns = builtin_problem(10, seed=0)
    checks = check_hypergradients(model, loss_fns, "mada", coefficients, learn=MADA_COEFS, lr=1e-2, weight_decay=0.1)
    assert [c.name for c in checks] == list(MADA_COEFS)
    nonzero = [c for c in checks if c.engine != 0.0]
    assert len(nonzero) >= (1 if point == "lion" else 6)
    for c in checks:
        if c.engine == 0.0:  # the Lion vertex: gamma = 0 multiplies every adaptive coefficient
            assert point == "lion" and abs(c.finite_difference) <= c.noise, c
        else:
            assert c.relative_error <= 1e-6, c


def test_gradcheck_detects_a_wrong_hypergradient(monkeypatch):
    """The oracle can fail: scale one coefficient's engine value and the check must flag it."""
    model, loss_fns = builtin_problem(10, seed=0)
    real = H.HyperOptimizer.hypergradients

    def skewed(self):
        out = real(self)
        out["c"] = out["c"] * 1.01
        return out

    monkeypatch.setattr(H.HyperOptimizer, "hypergradients", skewed)
    checks = check_hypergradients(model, loss_fns, "mada", MADA_INTERIOR, learn=MADA_COEFS, lr=1e-2)
    bad = {c.name for c in checks if not c.passed(1e-6)}
    assert bad == {"c"}


def test_gradcheck_command_exits_zero(capsys):
    from hypergrad.gradcheck import main
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in MADA_COEFS:
        assert f"{name:>12}" in out


def test_zero_gradient_parameters_keep_hypergradients_finite():
    """An embedding row that never receives a gradient has v = 0, where sqrt' is infinite."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.out = nn.Linear(6, 3)

        def forward(self, idx):
            return self.out(torch.tanh(self.emb(idx)))

    model = Net().double()
    batches = [(torch.randint(0, 5, (16,), generator=g), torch.randn(16, 3, generator=g, dtype=torch.float64))
               for _ in range(8)]  # rows 5..9 are never used: exactly zero gradient
    checks = check_hypergradients(model, _losses(batches), "mada", MADA_INTERIOR, learn=MADA_COEFS, lr=1e-2)
    for c in checks:
        assert math.isfinite(c.engine)
        assert c.relative_error <= 1e-6, c


def test_tied_weights_hypergradients():
    """A token embedding shared with the output head (one Parameter, two uses)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5)
            self.mix = nn.Linear(5, 5)
            self.head = nn.Linear(5, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.tanh(self.mix(self.emb(idx))))

    model = Tied().double()
    assert len(list(model.parameters())) == 3
    batches = [(torch.randint(0, 7, (12,), generator=g), torch.randint(0, 7, (12,), generator=g)) for _ in range(8)]
    losses = [lambda m, x=x, y=y: nn.functional.cross_entropy(m(x), y) for x, y in batches]
    checks = check_hypergradients(model, losses, "mada", MADA_INTERIOR, learn=MADA_COEFS, lr=1e-2)
    assert all(c.relative_error <= 1e-6 for c in checks), checks


# --------------------------------------------------------------------------- closed forms
def _regression(seed=0, steps=6):
    model, loss_fns = builtin_problem(steps, seed=seed)
    return model, loss_fns


def test_sgd_hd_closed_form():
    """dF_t/dlr = -g_t . g_{t-1} for plain SGD (Baydin et al. 2018)."""
    model, loss_fns = _regression()
    opt = H.HyperSGD(model.parameters(), lr=0.05, hyper_lr=0.0)
    prev = None
    for i, loss_fn in enumerate(loss_fns):
        opt.zero_grad()
        loss_fn(model).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
        opt.step()
        if prev is not None:
            expected = -float(g @ prev)
            assert opt.hypergradients()["lr"].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
        prev = g


def test_sgd_hd_learns_lr_with_the_closed_form_update():
    """With a plain-SGD hyper-level, lr_t = lr_{t-1} + kappa g_t . g_{t-1}."""
    model, loss_fns = _regression()
    kappa = 1e-3
    opt = H.HyperSGD(model.parameters(), lr=0.05, hyper_lr=kappa)
    lr, prev = 0.05, None
    for loss_fn in loss_fns:
        opt.zero_grad()
        loss_fn(model).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
        if prev is not None:
            lr = lr + kappa * float(g @ prev)
        opt.step()
        assert opt.coefficients()["lr"].item() == pytest.approx(lr, rel=1e-12)
        prev = g


def test_adam_hd_closed_form_against_torch_adam():
    """Adam-HD: dF_t/dlr = -g_t . u_{t-1}, u the Adam direction, taken from torch.optim.Adam in lockstep."""
    model, loss_fns = _regression()
    twin = copy.deepcopy(model)
    lr = 1e-2
    opt = H.HyperOptimizer(model.parameters(), "adam", lr=lr, learn=["lr"], tower=H.Level("sgd", lr=0.0))
    ref = torch.optim.Adam(twin.parameters(), lr=lr)
    u_prev = None
    for loss_fn in loss_fns:
        opt.zero_grad()
        ref.zero_grad()
        loss_fn(model).backward()
        loss_fn(twin).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
        before = torch.cat([p.detach().reshape(-1) for p in twin.parameters()])
        opt.step()
        ref.step()
        after = torch.cat([p.detach().reshape(-1) for p in twin.parameters()])
        if u_prev is not None:
            assert opt.hypergradients()["lr"].item() == pytest.approx(-float(g @ u_prev), rel=1e-9)
        u_prev = (before - after) / lr
        assert torch.allclose(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), after, atol=1e-14)


# --------------------------------------------------------------------------- backends and towers
def _tower(depth, top_lr=1e-4):
    if depth == 1:
        return [H.Level("adam", lr=1e-3)]
    if depth == 2:
        return [H.Level("adam", lr=1e-3, learn=["lr"]), H.Level("sgd", lr=top_lr)]
    return [H.Level("adam", lr=1e-3, learn=["lr"]), H.Level("sgd", lr=1e-4, momentum=0.5, learn=["lr", "momentum"]),
            H.Level("sgd", lr=top_lr)]


def _trajectory(backend, tower, steps=50, share="global", groups=False):
    model, loss_fns = builtin_problem(steps, seed=3)
    params = ([{"params": [model.fc1.weight, model.fc1.bias]},
               {"params": [p for n, p in model.named_parameters() if not n.startswith("fc1")], "lr": 5e-3}]
              if groups else model.parameters())
    opt = H.HyperOptimizer(params, "mada", lr=1e-2, weight_decay=0.1, tower=tower, backend=backend, share=share,
                           **{k: v for k, v in MADA_INTERIOR.items()})
    rows = []
    for loss_fn in loss_fns:
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
        rows.append(torch.cat([q.detach().clone() for q in opt._q]))
    return torch.stack(rows), torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_backends_agree(depth):
    a, xa = _trajectory("functional", _tower(depth))
    b, xb = _trajectory("graph", _tower(depth))
    assert (a[-1] - a[0]).abs().max() > 1e-4  # the coefficients really moved
    assert (a - b).abs().max() <= 1e-10
    assert (xa - xb).abs().max() <= 1e-10


# The functional backend's eager path leaves a recorded bucket at the state *before* the recorded
# update (the next vjp advances it in place), keeping S + 1 buffers; the graph backend keeps the
# old state in its record and new buffers in the bucket (2S + 1). Read through opt.state and
# state_dict, both are the current state: the graph backend is the oracle for the lagging one.
@pytest.mark.parametrize("rule,mode,kwargs", [
    ("mada", "decoupled", MADA_INTERIOR),   # g_prev: the gradient record becomes its buffer
    ("adan", "decoupled", {}),              # prev_grad, likewise
    ("nadam", "l2", {}),                    # a scalar state (mu_product) and a copy of x (L2 decay)
    ("adam", "l2", {}),
])
@pytest.mark.parametrize("interval", [1, 2])
def test_lagging_eager_state_is_the_graph_backends(rule, mode, kwargs, interval):
    def run(backend):
        model, loss_fns = builtin_problem(10, seed=5)
        opt = H.HyperOptimizer(model.parameters(), rule, lr=1e-2, weight_decay=0.1, weight_decay_mode=mode,
                               backend=backend, warmup=1, hyper_interval=interval, **kwargs)
        opt.chunk_numel = 7  # several chunks per bucket: the vjp advances the buffers chunk by chunk
        out = []
        for loss_fn in loss_fns:
            opt.zero_grad()
            loss_fn(model).backward()
            opt.step()
            state = [{n: torch.as_tensor(v).clone() for n, v in opt.state[p].items()} for p in model.parameters()]
            out.append((torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt._q[0].clone(), state,
                        copy.deepcopy(opt.state_dict()["state"])))
        return opt, out

    lagging, a = run("functional")
    _, b = run("graph")
    fam = lagging.family
    # (the backends sum the vjp in different orders; the hyper-level Adam's first steps amplify that
    # to ~1e-9 here (NAdam), and a gradient near 0 differs by that much: a state advanced twice or not at all
    # is off by a whole step)
    close = dict(rtol=1e-6, atol=1e-8)
    for (xa, qa, sa, da), (xb, qb, sb, db) in zip(a, b):
        torch.testing.assert_close(xa, xb, **close)
        torch.testing.assert_close(qa, qb, **close)
        for state_a, state_b in [*zip(sa, sb), *zip(da.values(), db.values())]:
            assert set(state_a) == set(state_b) == {"step", *fam.state_names}
            for n in state_a:
                torch.testing.assert_close(torch.as_tensor(state_a[n]), torch.as_tensor(state_b[n]), **close, msg=n)
    assert (a[-1][1] - a[0][1]).abs().max() > 1e-5  # the coefficients moved
    # what the lagging path keeps: the S tensor buffers, the gradient record and, with L2 decay, x
    recorded = lagging._records0 is not None
    assert recorded == (interval == 1)  # 10 steps, warm-up 1: with interval 2 the last step learns and records nothing
    kept = {v.untyped_storage().data_ptr() for b in lagging._buckets.values() for v in b.flat.values() if v.dim()}
    for rec in lagging._records0 or []:
        kept |= {rec[k].untyped_storage().data_ptr() for k in ("g", "x") if rec[k] is not None}
        assert all(rec["state"][n] is lagging._buckets[tuple(map(id, rec["params"]))].flat[n] for n in fam.state_names)
    S = sum(1 for st in fam.states if not st.scalar)
    n_buckets = len(lagging._buckets)
    assert len(kept) == n_buckets * (S + (1 + (mode == "l2") if recorded else 0))


@pytest.mark.parametrize("share", ["group", "tensor"])
def test_backends_agree_with_sharing(share):
    a, _ = _trajectory("functional", _tower(1), steps=20, share=share, groups=True)
    b, _ = _trajectory("graph", _tower(1), steps=20, share=share, groups=True)
    assert (a - b).abs().max() <= 1e-10


@pytest.mark.parametrize("depth", [2, 3])
def test_tower_with_zero_top_lr_equals_shorter_tower(depth):
    tower = _tower(depth, top_lr=0.0)
    tall, x_tall = _trajectory("functional", tower, steps=30)
    below_top = tower[-2]  # the same level, no longer learning anything
    shorter = tower[:-2] + [H.Level(below_top.family, lr=below_top.lr,
                                    **{k: v for k, v in below_top.values.items() if k != "lr"})]
    short, x_short = _trajectory("functional", shorter, steps=30)
    n = short.shape[1]
    assert (tall[:, :n] - short).abs().max() <= 1e-12
    assert (x_tall - x_short).abs().max() <= 1e-12


def test_every_level_of_a_depth3_tower_matches_finite_differences():
    def build():
        model, _ = builtin_problem(8, seed=0)
        opt = H.HyperOptimizer(model.parameters(), "mada", lr=1e-2, weight_decay=0.1, **MADA_INTERIOR,
                               tower=[H.Level("adam", lr=1e-3, learn=["lr"]),
                                      H.Level("sgd", lr=1e-2, momentum=0.5, learn=["lr", "momentum"]),
                                      H.Level("sgd", lr=1e-3)])
        return model, opt

    _, loss_fns = builtin_problem(8, seed=0)
    levels = check_tower_hypergradients(build, loss_fns, delta=(1e-4, 1e-4, 1e-3))
    assert [len(level) for level in levels] == [6, 1, 2]
    for level in levels:
        for c in level:
            assert c.engine != 0.0 and c.relative_error <= 1e-6, c


def test_group_sharing_matches_finite_differences():
    def build():
        model, _ = builtin_problem(6, seed=0)
        groups = [{"params": [model.fc1.weight, model.fc1.bias]},
                  {"params": [p for n, p in model.named_parameters() if not n.startswith("fc1")]}]
        return model, H.HyperOptimizer(groups, "mada", lr=1e-2, share="group", **MADA_INTERIOR,
                                       tower=H.Level("sgd", lr=1e-3))

    _, loss_fns = builtin_problem(6, seed=0)
    (level,) = check_tower_hypergradients(build, loss_fns, delta=1e-5)
    assert len(level) == 12
    assert all(c.relative_error <= 1e-6 for c in level), level


# --------------------------------------------------------------------------- optimizer behaviour
def test_fixed_coefficients_equal_rule_optimizer():
    """Hyper-learning rate 0: the model trajectory is the plain rule's."""
    model, loss_fns = builtin_problem(12, seed=4)
    twin = copy.deepcopy(model)
    opt = H.MADA(model.parameters(), lr=1e-2, weight_decay=0.1, tower=H.Level("sgd", lr=0.0))
    ref = O.RuleOptimizer(twin.parameters(), O.mada(), lr=1e-2, weight_decay=0.1)
    for loss_fn in loss_fns:
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            loss_fn(m).backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_hyperadam_learns_only_betas():
    model, loss_fns = builtin_problem(10, seed=0)
    opt = H.HyperAdam(model.parameters(), lr=1e-2, tower=H.Level("sgd", lr=1e-2))
    for loss_fn in loss_fns:
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
    coefs = opt.coefficients()
    assert set(coefs) == {"beta1", "beta2"}
    assert coefs["beta1"].item() != 0.9 and coefs["beta2"].item() != 0.95
    assert opt.family.state_names == ("m", "v_bar")  # the Adam vertex carries no Yogi/Lion/Adan state


def test_warmup_delays_hyper_learning():
    model, loss_fns = builtin_problem(8, seed=0)
    opt = H.MADA(model.parameters(), lr=1e-2, warmup=4, tower=H.Level("sgd", lr=1e-1))
    start = {k: v.item() for k, v in opt.coefficients().items()}
    seen = []
    for loss_fn in loss_fns:
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
        seen.append({k: v.item() for k, v in opt.coefficients().items()})
    assert all(s == start for s in seen[:4])
    assert seen[4] != start


@pytest.mark.parametrize("backend", ["functional", "graph"])
@pytest.mark.parametrize("interval,warmup", [(3, 0), (2, 4)])
def test_hyper_interval_sgd_hd_closed_form(backend, interval, warmup):
    """Learning every ``interval`` steps: the update of step s is recorded exactly when s >= max(warmup, 1)
    and (s - max(warmup, 1)) is a multiple of ``interval``; the next step learns from it with
    Baydin et al.'s closed form, lr += kappa g_t . g_{t-1}; every other step is plain SGD with the
    current lr and keeps no record."""
    model, loss_fns = builtin_problem(12, seed=1)
    kappa = 1e-3
    opt = H.HyperSGD(model.parameters(), lr=0.05, hyper_lr=kappa, hyper_interval=interval, warmup=warmup,
                     backend=backend)
    first = max(warmup, 1)
    lr, prev, learned = 0.05, None, []
    for s, loss_fn in enumerate(loss_fns, start=1):
        opt.zero_grad()
        loss_fn(model).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
        x = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if prev is not None:  # the last update was recorded: this step learns
            lr = lr + kappa * float(g @ prev)
            learned.append(s)
        opt.step()
        assert opt.coefficients()["lr"].item() == pytest.approx(lr, rel=1e-12)
        x_new = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert torch.allclose(x_new, x - lr * g, rtol=0, atol=1e-15)  # SGD with the lr of this step
        recorded = s >= first and (s - first) % interval == 0
        assert (opt._records0 is not None) == recorded
        prev = g if recorded else None
    assert learned == [s + 1 for s in range(first, 12, interval)]


def test_hyper_interval_learns_less_often_than_every_step():
    """MADA learning every 4th step moves its coefficients at the hyper-steps only, and by the
    hypergradient of the recorded update: the first hyper-step equals that of an optimizer learning
    every step (same history up to it)."""
    runs = {}
    for interval in (1, 4):
        model, loss_fns = builtin_problem(7, seed=2)
        opt = H.MADA(model.parameters(), lr=1e-2, hyper_interval=interval, tower=H.Level("sgd", lr=1e-1),
                     **MADA_INTERIOR)
        rows = []
        for loss_fn in loss_fns:
            opt.zero_grad()
            loss_fn(model).backward()
            opt.step()
            rows.append(opt._q[0].detach().clone())
        runs[interval] = torch.stack(rows)
    every, sparse = runs[1], runs[4]
    assert torch.equal(sparse[1], every[1])  # step 2 learns from step 1 in both
    # records at steps 1 and 5: the coefficients move at steps 2 and 6 only (rows 1 and 5)
    changed = [s for s in range(1, 7) if not torch.equal(sparse[s], sparse[s - 1])]
    assert changed == [1, 5]


def test_projection_keeps_coefficients_in_their_domains():
    model, loss_fns = builtin_problem(20, seed=0)
    opt = H.MADA(model.parameters(), lr=1e-2, tower=H.Level("sgd", lr=1e3), c=1.0, gamma=1.0, rho=0.0)
    domains = {n: O.mada().coefficients[n].domain for n in MADA_COEFS}
    hit = set()
    for loss_fn in loss_fns:
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
        for n, v in opt.coefficients().items():
            assert domains[n].contains(v.item()), (n, v)
            if v.item() in (domains[n].low, domains[n].high):
                hit.add(n)
    assert hit  # a huge hyper-learning rate pushes some coefficients onto a bound


def test_hypergradient_clipping():
    model, loss_fns = builtin_problem(3, seed=0)
    clip = 1e-6
    opt = H.MADA(model.parameters(), lr=1e-2, clip_hypergrad=clip, tower=H.Level("sgd", lr=1.0), **MADA_INTERIOR)
    before = None
    for loss_fn in loss_fns:
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
        now = torch.stack([opt.coefficients()[n] for n in MADA_COEFS])
        if before is not None:
            hg = torch.stack([opt.hypergradients()[n] for n in MADA_COEFS])
            assert torch.allclose(before - now, torch.clamp(hg, -clip, clip), rtol=0, atol=1e-15)
        before = now


def test_per_coefficient_hyper_learning_rates():
    model, loss_fns = builtin_problem(3, seed=0)
    opt = H.MADA(model.parameters(), lr=1e-2, tower=H.Level("sgd", lr=1e-2, lr_scale={"gamma": 0.0, "c": 2.0}),
                 **MADA_INTERIOR)
    for loss_fn in loss_fns:
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
    assert opt.coefficients()["gamma"].item() == MADA_INTERIOR["gamma"]
    assert opt.coefficients()["c"].item() != MADA_INTERIOR["c"]


def test_drop_in_training_loop_with_groups_scheduler_accumulation_and_clipping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = H.MADA([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 4, generator=g)
    first = None
    for step in range(30):
        opt.zero_grad()
        for micro in range(2):  # gradient accumulation
            xb, yb = x[micro * 32:(micro + 1) * 32], y[micro * 32:(micro + 1) * 32]
            loss = nn.functional.mse_loss(model(xb), yb) / 2
            loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    assert opt.param_groups[0]["lr"] < 3e-3
    assert all(math.isfinite(v.item()) for v in opt.coefficients().values())
    assert set(opt.hypergradients()) == set(MADA_COEFS)


def test_bad_arguments_are_rejected():
    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="share"):
        H.MADA(p, share="layer")
    with pytest.raises(ValueError, match="backend"):
        H.MADA(p, backend="magic")
    with pytest.raises(ValueError, match="learn"):
        H.MADA(p, learn=["beta9"])
    with pytest.raises(ValueError, match="top level"):
        H.MADA(p, tower=H.Level("adam", learn=["lr"]))
    with pytest.raises(ValueError, match="Level lr"):
        H.Level("sgd", lr=-1.0)
    with pytest.raises(ValueError, match="warmup"):
        H.MADA(p, warmup=-1)
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="hyper_interval"):
            H.MADA(p, hyper_interval=bad)
    with pytest.raises(ValueError, match="clip_hypergrad"):
        H.MADA(p, clip_hypergrad=0.0)
    with pytest.raises(ValueError, match="beta2"):
        H.MADA(p, beta2=1.5)


# --------------------------------------------------------------------------- multi-step unrolls
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_unrolled_hypergradients_match_higher(k):
    import warnings

    higher = pytest.importorskip("higher")
    from hypergrad.unroll import unrolled_hypergradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64))
               for _ in range(k + 1)]
    crit = nn.functional.mse_loss
    eps = 1e-14  # higher's Adam puts eps outside sqrt(v) and scales the step by sqrt(bc2): equal as eps -> 0
    lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    b1 = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    b2 = torch.tensor(0.99, dtype=torch.float64, requires_grad=True)
    base = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=eps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with higher.innerloop_ctx(model, base, override={"lr": [lr], "betas": [(b1, b2)]},
                                  copy_initial_weights=True) as (fmodel, dopt):
            for x, y in batches[:-1]:
                dopt.step(crit(fmodel(x), y))
            final = crit(fmodel(batches[-1][0]), batches[-1][1])
            ref_lr, ref_b1 = torch.autograd.grad(final, [lr, b1])
    loss, ours = unrolled_hypergradients(model, "adam", batches, crit, dict(beta1=0.9, beta2=0.99, eps=eps),
                                         learn=("lr", "beta1", "beta2"), lr=0.01)
    assert loss == pytest.approx(float(final), rel=1e-10)
    assert ours["lr"] == pytest.approx(float(ref_lr), rel=1e-8)
    assert ours["beta1"] == pytest.approx(float(ref_b1), rel=1e-8, abs=1e-14)
    # higher drops beta2's path through the bias correction (it takes math.sqrt of bc2), so beta2 is
    # checked against central differences of the unrolled loss instead.
    d = 1e-6
    up, _ = unrolled_hypergradients(model, "adam", batches, crit, dict(beta1=0.9, beta2=0.99 + d, eps=eps), learn=(), lr=0.01)
    down, _ = unrolled_hypergradients(model, "adam", batches, crit, dict(beta1=0.9, beta2=0.99 - d, eps=eps), learn=(), lr=0.01)
    assert ours["beta2"] == pytest.approx((up - down) / (2 * d), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("mode, learn, recorded", [("decoupled", None, False), ("proximal", None, False),
                                                   ("l2", None, True), ("decoupled", ["lr", "beta1"], True)])
def test_records_copy_x_only_where_the_vjp_reads_it(monkeypatch, helpers, mode, learn, recorded):
    """With decoupled or proximal decay and a fixed lr, x enters the update additively with no learned
    coefficient on it: the record keeps no copy of x, and the coefficients and parameters come out
    bit for bit as with a copy (forced here); L2 decay and a learned lr do read x."""
    runs = {}
    for force in (False, True):
        if force:
            monkeypatch.setattr(H.HyperOptimizer, "_vjp_reads_x", lambda self, mode: True)
        model, loss_fns = builtin_problem(6, seed=3)
        opt = H.HyperOptimizer(model.parameters(), "mada", lr=1e-2, weight_decay=0.1, weight_decay_mode=mode,
                               learn=learn, **MADA_INTERIOR)
        helpers.train_on(model, opt, loss_fns, loss=lambda m, loss_fn: loss_fn(m))
        assert all((rec["x"] is not None) == (recorded or force) for rec in opt._records0)
        runs[force] = helpers.flat(opt._q), helpers.flat_params(model)
    assert torch.equal(runs[False][0], runs[True][0]) and torch.equal(runs[False][1], runs[True][1])
    initial = runs[False][0].new_tensor([float(opt.param_groups[0][n]) for n in opt.learn])
    assert (runs[False][0] - initial).abs().max().item() > 1e-6  # the coefficients moved
