"""One shared table, optax style: every rule in ``optimizers.RULES`` and every MADA vertex goes
through the same properties of a ``torch.optim.Optimizer``.

A rule added to ``RULES`` (or a vertex added to ``MADA_VERTICES``) joins the table automatically;
only its learning rate may need an entry in ``LR`` below.
"""
import copy
import io

import pytest
import torch
from torch import nn

import optimizers as O

# Sign-based rules move every coordinate by lr per step: they need a smaller lr than the rest.
LR = {"sgd": 0.1, "sgd_nesterov": 0.05, "lion": 3e-3, "mada@lion": 3e-3}
DEFAULT_LR = 1e-2
# Move off defaults that switch a branch off: SGD's registered rule has momentum 0, MADA's default
# beta3 = 0 silences Adan's difference term (and gamma = 1 Lion); use interior values instead.
KWARGS = {"sgd": dict(momentum=0.9, dampening=0.1), "sgd_nesterov": dict(momentum=0.9),
          "mada": dict(beta3=0.3, c=0.5, rho=0.5, gamma=0.8), "mada@adan": dict(beta3=0.5)}


def _families():
    table = {name: (lambda name=name: O.get_rule(name)) for name in O.RULES}
    table.update({f"mada@{v}": (lambda v=v: O.mada().vertex(v)) for v in O.MADA_VERTICES})
    return table


FAMILIES = _families()
RULE_NAMES = list(FAMILIES)


def make_opt(name, params, **overrides):
    kwargs = dict(lr=LR.get(name, DEFAULT_LR), **KWARGS.get(name, {}))
    kwargs.update(overrides)
    return O.RuleOptimizer(params, FAMILIES[name](), **kwargs)


def test_table_covers_every_rule_and_vertex():
    assert set(RULE_NAMES) == set(O.RULES) | {f"mada@{v}" for v in O.MADA_VERTICES}
    assert len(RULE_NAMES) == len(O.RULES) + len(O.MADA_VERTICES)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_loss_decreases(helpers, name):
    model, batch = helpers.make_model(), helpers.make_batch()
    losses = helpers.train(model, make_opt(name, model.parameters()), batch, steps=30)
    final = helpers.loss_fn(model, batch).item()
    assert final < 0.9 * losses[0], f"{name}: loss {losses[0]:.4f} -> {final:.4f}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", RULE_NAMES)
def test_shapes_dtypes_kept_and_finite(helpers, name, dtype):
    model, batch = helpers.make_model(dtype), helpers.make_batch(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_opt(name, model.parameters(), weight_decay=0.01)
    helpers.train(model, opt, batch, steps=10)
    for p, p0 in zip(model.parameters(), before):
        assert p.shape == p0.shape and p.dtype == dtype
        assert torch.isfinite(p).all()
        state = opt.state[p]
        assert state["step"] == 10
        for key, buf in state.items():
            if key == "step":
                continue
            assert buf.dtype == dtype, key
            assert buf.dim() == 0 or buf.shape == p.shape, key
            assert torch.isfinite(buf).all(), key
    assert any(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), before))


@pytest.mark.parametrize("name", RULE_NAMES)
def test_parameters_without_gradient_are_untouched(helpers, name):
    """A parameter with ``grad is None`` is not updated (not even decayed), and its state is neither
    created nor advanced; a parameter that skips every other step counts only the steps it took."""
    model, batch = helpers.make_model(), helpers.make_batch()
    unused = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    unused0 = unused.detach().clone()
    sometimes = model[0].weight  # gets a gradient on even steps only
    opt = make_opt(name, [*model.parameters(), unused], weight_decay=0.1)
    steps_taken = 0
    for i in range(8):
        opt.zero_grad(set_to_none=True)
        helpers.loss_fn(model, batch).backward()
        if i % 2:
            sometimes.grad = None
            snapshot = sometimes.detach().clone()
            state_snapshot = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[sometimes].items()}
        opt.step()
        if i % 2:
            assert torch.equal(sometimes, snapshot)
            assert set(opt.state[sometimes]) == set(state_snapshot)
            for k, v in state_snapshot.items():
                now = opt.state[sometimes][k]
                assert torch.equal(now, v) if torch.is_tensor(v) else now == v, k
        else:
            steps_taken += 1
        assert opt.state[sometimes]["step"] == steps_taken
    assert torch.equal(unused.detach(), unused0)
    assert len(opt.state.get(unused, {})) == 0
    assert opt.state[model[2].weight]["step"] == 8


@pytest.mark.parametrize("name", RULE_NAMES)
def test_state_dict_round_trip(helpers, name):
    """state_dict -> torch.save -> torch.load(weights_only=True) -> a fresh optimizer on a copy of
    the model: continuing it gives exactly the parameters of continuing the original."""
    model, batch = helpers.make_model(), helpers.make_batch()
    opt = make_opt(name, model.parameters(), weight_decay=0.01)
    helpers.train(model, opt, batch, steps=5)

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    resumed_model = copy.deepcopy(model)
    resumed = make_opt(name, resumed_model.parameters(), weight_decay=0.01)
    resumed.load_state_dict(loaded)
    fresh_model = copy.deepcopy(model)
    fresh = make_opt(name, fresh_model.parameters(), weight_decay=0.01)

    for m, o in ((model, opt), (resumed_model, resumed), (fresh_model, fresh)):
        helpers.train(m, o, batch, steps=5)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(opt.state.values(), resumed.state.values()):
        assert p.keys() == q.keys()
        assert all(torch.equal(p[k], q[k]) if torch.is_tensor(p[k]) else p[k] == q[k] for k in p)
    # The loaded state mattered: an optimizer started afresh from the same weights ends elsewhere.
    assert helpers.max_diff(model, fresh_model) > 1e-8


@pytest.mark.parametrize("name", RULE_NAMES)
def test_lr_scheduler(helpers, name):
    """StepLR drives the lr the optimizer reads each step: once it reaches 0 nothing moves (weight
    decay included), and before that the run equals an unscheduled one."""
    batch = helpers.make_batch()
    model, plain_model = helpers.make_model(), helpers.make_model()
    opt = make_opt(name, model.parameters(), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.0)
    plain = make_opt(name, plain_model.parameters(), weight_decay=0.1)
    for _ in range(3):
        helpers.train(model, opt, batch, steps=1)
        scheduler.step()
    helpers.train(plain_model, plain, batch, steps=3)
    assert helpers.max_diff(model, plain_model) == 0.0
    assert opt.param_groups[0]["lr"] == 0.0
    frozen = helpers.flat_params(model)
    for _ in range(3):
        helpers.train(model, opt, batch, steps=1)
        scheduler.step()
    assert torch.equal(helpers.flat_params(model), frozen)
    assert opt.state[model[0].weight]["step"] == 6


@pytest.mark.parametrize("name", RULE_NAMES)
def test_closure(helpers, name):
    """``step(closure)`` evaluates the closure with grad enabled, returns its loss, and steps as usual."""
    batch = helpers.make_batch()
    model, manual_model = helpers.make_model(), helpers.make_model()
    opt = make_opt(name, model.parameters())

    def closure():
        opt.zero_grad()
        loss = helpers.loss_fn(model, batch)
        loss.backward()
        return loss

    returned = [opt.step(closure).item() for _ in range(5)]
    manual = helpers.train(manual_model, make_opt(name, manual_model.parameters()), batch, steps=5)
    assert returned == manual
    assert helpers.max_diff(model, manual_model) == 0.0


@pytest.mark.parametrize("name", RULE_NAMES)
def test_param_groups_with_different_lr(helpers, name):
    """Two param groups with their own lr behave like two optimizers, one per group."""
    batch = helpers.make_batch()
    lr = LR.get(name, DEFAULT_LR)
    model, split_model = helpers.make_model(), helpers.make_model()

    def groups(m):
        first = list(m[0].parameters())
        rest = [p for p in m.parameters() if all(p is not q for q in first)]
        return first, rest

    first, rest = groups(model)
    opt = make_opt(name, [{"params": first, "lr": lr * 3}, {"params": rest}], weight_decay=0.01)
    assert [g["lr"] for g in opt.param_groups] == [lr * 3, lr]
    first_s, rest_s = groups(split_model)
    a = make_opt(name, first_s, lr=lr * 3, weight_decay=0.01)
    b = make_opt(name, rest_s, weight_decay=0.01)
    for _ in range(10):
        opt.zero_grad()
        helpers.loss_fn(model, batch).backward()
        opt.step()
        a.zero_grad()
        b.zero_grad()
        helpers.loss_fn(split_model, batch).backward()
        a.step()
        b.step()
    torch.testing.assert_close(helpers.flat_params(model), helpers.flat_params(split_model), rtol=0, atol=1e-12)
    # ... and the lr of the first group really differs from a single-lr run.
    single_model = helpers.make_model()
    helpers.train(single_model, make_opt(name, single_model.parameters(), weight_decay=0.01), batch, steps=10)
    assert helpers.max_diff(model, single_model) > 1e-6


@pytest.mark.parametrize("name", RULE_NAMES)
def test_zeroing_gradients_in_place(helpers, name):
    """``zero_grad(set_to_none=False)`` (and so gradient accumulation, which adds into ``.grad``) must
    not change the trajectory: no optimizer buffer may alias a gradient. One param group per tensor,
    so that buckets hold a single tensor (the case where a flat view is the tensor itself)."""
    batch = helpers.make_batch()
    results = []
    for set_to_none in (True, False):
        model = helpers.make_model()
        opt = make_opt(name, [{"params": [p]} for p in model.parameters()], weight_decay=0.01)
        for _ in range(6):
            opt.zero_grad(set_to_none=set_to_none)
            helpers.loss_fn(model, batch).backward()
            opt.step()
        results.append(helpers.flat_params(model))
    assert torch.equal(*results)
