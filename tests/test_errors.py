"""Bad input fails loudly, with a ValueError/TypeError whose message names the argument.

A value outside its declared domain is an error, never a silent clamp (design.md §2.2).
"""
import pytest
import torch
from torch import nn

import optimizers as O


@pytest.fixture
def params():
    torch.manual_seed(0)
    return list(nn.Linear(3, 2).double().parameters())


def _step(opt, params):
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()


# ------------------------------------------------------------------------------ construction
@pytest.mark.parametrize("family, kwargs, name", [
    (O.adam, dict(beta1=1.5), "beta1"),
    (O.adam, dict(beta2=1.0), "beta2"),          # beta = 1 would zero the bias correction
    (O.adam, dict(betas=(0.9, -0.1)), "beta2"),
    (O.adam, dict(eps=0.0), "eps"),
    (O.adam, dict(eps=-1e-8), "eps"),
    (O.sgd, dict(momentum=1.2), "momentum"),
    (O.lion, dict(beta1=-0.5), "beta1"),
    (O.nadam, dict(momentum_decay=-1.0), "momentum_decay"),
    (O.mada, dict(rho=1.01), "rho"),
    (O.mada, dict(c=-0.1), "c"),
    (O.mada, dict(gamma=2.0), "gamma"),
    (O.mada, dict(beta3=0.995), "beta3"),
    (O.mada, dict(beta2=0.4), "beta2"),
    (O.mada, dict(beta1=float("nan")), "beta1"),
], ids=lambda v: v.__name__ if callable(v) else None)
def test_coefficient_outside_domain_at_construction(params, family, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        O.RuleOptimizer(params, family(), **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(beta1="0.9"), "beta1"),
    (dict(beta1=True), "beta1"),
    (dict(beta2=torch.tensor([0.9, 0.99])), "beta2"),
    (dict(lr="1e-3"), "lr"),
])
def test_coefficient_of_wrong_type(params, kwargs, name):
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        O.RuleOptimizer(params, O.adam(), **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1e-3), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr=float("inf")), "lr"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(weight_decay_mode="sometimes"), "weight_decay_mode"),
])
def test_bad_lr_and_weight_decay(params, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        O.RuleOptimizer(params, O.adamw(), **kwargs)


def test_bad_value_in_a_param_group_at_construction(params):
    with pytest.raises(ValueError, match=r"beta1 \(param group 1\)"):
        O.RuleOptimizer([{"params": params[:1]}, {"params": params[1:], "beta1": 2.0}], O.adam())


# ------------------------------------------------------------------------------ changed before step
@pytest.mark.parametrize("key, value", [
    ("beta2", 1.0), ("eps", 0.0), ("lr", -0.1), ("weight_decay", -1.0), ("rho", 1.5), ("gamma", -0.2),
])
def test_param_group_value_changed_before_step(params, key, value):
    opt = O.RuleOptimizer(params, O.mada(), lr=1e-2)
    before = [p.detach().clone() for p in params]
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"\b{key}\b.*param group 0"):
        _step(opt, params)
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "a rejected step must not move anything"
    assert len(opt.state) == 0 or all("step" not in s for s in opt.state.values())


@pytest.mark.parametrize("key, value", [("beta2", 1.0), ("lr", -0.1), ("weight_decay_mode", "l1"), ("gamma", 2)])
def test_param_group_value_changed_after_a_step(params, key, value):
    """A group checked at an earlier step (and not checked again while its plain-number values stay
    the same) is checked again once a value changes."""
    opt = O.RuleOptimizer(params, O.mada(), lr=1e-2)
    _step(opt, params)
    _step(opt, params)
    before = [p.detach().clone() for p in params]
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"\b{key}\b.*param group 0"):
        _step(opt, params)
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "a rejected step must not move anything"


def test_rejected_step_moves_no_group(params):
    opt = O.RuleOptimizer([{"params": params[:1]}, {"params": params[1:]}], O.adam(), lr=1e-2)
    before = [p.detach().clone() for p in params]
    opt.param_groups[1]["beta2"] = 1.0
    with pytest.raises(ValueError, match=r"beta2 \(param group 1\)"):
        _step(opt, params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


# ------------------------------------------------------------------------------ names
def test_unknown_vertex():
    with pytest.raises(ValueError, match="adamax"):
        O.mada().vertex("adamax")


def test_unknown_rule_name(params):
    with pytest.raises(ValueError, match="adamax"):
        O.build_optimizer("adamax", params)
    with pytest.raises(ValueError, match="adamax"):
        O.RuleOptimizer(params, "adamax")


@pytest.mark.parametrize("family, kwargs, name", [
    (O.adam, dict(gamma=0.5), "gamma"),
    (O.adam, dict(beta_1=0.9), "beta_1"),
    (lambda: O.mada().vertex("adam"), dict(rho=0.5), "rho"),   # pruned at the vertex: no longer an argument
    (lambda: O.mada().vertex("lion"), dict(beta1=0.9), "beta1"),
])
def test_unknown_coefficient_kwarg(params, family, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        O.RuleOptimizer(params, family(), **kwargs)


def test_unknown_param_group_key(params):
    with pytest.raises(ValueError, match="rho"):
        O.RuleOptimizer([{"params": params, "rho": 0.5}], O.adam())


def test_betas_for_a_family_without_them(params):
    with pytest.raises(ValueError, match="betas"):
        O.RuleOptimizer(params, O.sgd(), betas=(0.9, 0.99))


def test_restricting_a_family_validates(params):
    with pytest.raises(ValueError, match="rho"):
        O.mada().at(rho=2.0)
    with pytest.raises(ValueError, match="foo"):
        O.mada().at(foo=0.5)


# ------------------------------------------------------------------------------ parameters
def test_sparse_gradient():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = O.RuleOptimizer(emb.parameters(), O.adam())
    emb(torch.tensor([1, 2, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_floating_parameter(dtype):
    with pytest.raises(TypeError, match=r"parameter 0 .*dtype"):
        O.RuleOptimizer([torch.zeros(3, dtype=dtype)], O.adam())


# ------------------------------------------------------------------------------ the DSL
def test_undeclared_coefficient():
    with pytest.raises(ValueError, match="beta"):
        O.Family("f", [], O.Coef("beta") * O.grad)


def test_undefined_state():
    m = O.State("m")
    with pytest.raises(ValueError, match=r"'m'.*never defined"):
        O.Family("f", [], m.prev + O.grad)


def test_state_defined_twice():
    m = O.State("m", definition=O.grad)
    with pytest.raises(ValueError, match="already defined"):
        m.define(O.grad)


def test_two_states_with_one_name():
    a, b = O.State("m"), O.State("m")
    a.define(O.grad + a.prev)
    b.define(O.grad + b.prev)
    with pytest.raises(ValueError, match="'m'"):
        O.Family("f", [], a + b)


def test_interval_low_above_high():
    with pytest.raises(ValueError, match="low"):
        O.Interval(1.0, 0.0)


def test_coefficient_init_outside_its_domain():
    with pytest.raises(ValueError, match="beta"):
        O.Coefficient("beta", 2.0, O.Interval(0.0, 1.0))


def test_coefficient_declared_twice():
    with pytest.raises(ValueError, match="twice"):
        O.Family("f", [O.Coefficient("k", 0.5), O.Coefficient("k", 0.5)], O.Coef("k") * O.grad)


def test_non_numeric_in_expression():
    with pytest.raises(TypeError, match="str"):
        O.grad * "2"


def test_unknown_vertex_coefficient_in_declaration():
    with pytest.raises(ValueError, match="rho"):
        O.Family("f", [O.Coefficient("k", 0.5)], O.Coef("k") * O.grad, vertices={"v": {"rho": 1.0}})
