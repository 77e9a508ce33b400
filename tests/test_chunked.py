"""The eager (non-compiled) updates run chunk by chunk (``optimizers.functional.chunk_plan``): every
rule is elementwise, so any chunk size must give the numbers of one chunk over the whole bucket
(which the parity tests check against torch.optim and the papers' reference loops)."""
import pytest
import torch
from torch import nn

import hypergrad as H
import optimizers as O
from hypergrad.gradcheck import MADA_INTERIOR, builtin_problem
from optimizers.functional import CHUNK_NUMEL, chunk_plan, chunk_spans, default_chunk_numel, gather, scatter_add_

WHOLE = 1 << 40  # one chunk per bucket


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randn(4, 3, generator=g).t(),
            torch.randn(1, generator=g), torch.randn(17, generator=g), torch.randn(2, 2, generator=g)]


@pytest.mark.parametrize("chunk_numel", [1, 4, 5, 7, 100])
def test_chunk_plan_covers_the_flat_layout_once_in_order(chunk_numel):
    tensors = _tensors()
    plan = chunk_plan(tensors, chunk_numel)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    assert plan[0][0] == 0 and plan[-1][1] == flat.numel()
    for (start, stop, pieces), nxt in zip(plan, plan[1:] + [(flat.numel(), None, None)]):
        assert stop == nxt[0]  # consecutive, no gap
        assert sum(b - a for _, a, b in pieces) == stop - start
        strided = [i for i, _, _ in pieces if not tensors[i].is_contiguous()]
        if strided:  # a strided tensor is whole and alone
            assert len(pieces) == 1 and (pieces[0][1], pieces[0][2]) == (0, tensors[strided[0]].numel())
        else:
            assert stop - start <= chunk_numel
        assert torch.equal(gather(tensors, pieces, torch.float64), flat[start:stop].double())


def test_scatter_add_writes_each_piece_into_its_tensor():
    tensors = _tensors()
    expected = [t + 10 * (i + 1) for i, t in enumerate(tensors)]
    flat_add = torch.cat([torch.full((t.numel(),), 10.0 * (i + 1)) for i, t in enumerate(tensors)])
    for start, stop, pieces in chunk_plan(tensors, 5):
        scatter_add_(tensors, pieces, flat_add[start:stop])
    for t, e in zip(tensors, expected):
        assert torch.equal(t, e)


def test_chunk_sizes_are_checked_and_default_per_device():
    assert chunk_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_spans(0, 4) == [] and chunk_spans(10, None) == [(0, 10)]
    assert [(a, b) for a, b, _ in chunk_plan(_tensors(), None)] == [(0, 17), (17, 29), (29, 51)]  # strided apart
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_numel"):
            chunk_spans(10, bad)
        with pytest.raises(ValueError, match="chunk_numel"):
            default_chunk_numel(bad, torch.device("cpu"))
    assert default_chunk_numel(None, torch.device("cpu")) == CHUNK_NUMEL
    assert default_chunk_numel(None, torch.device("meta")) is None  # a GPU's allocator reuses memory
    assert default_chunk_numel(7, torch.device("meta")) == 7


def _rule_run(name, chunk_numel, dtype=torch.float64, state_dtype=None, steps=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)
    model[2].weight = nn.Parameter(model[2].weight.detach().t().contiguous().t())  # strided
    extra = {"momentum": 0.9} if name.startswith("sgd") else {}
    if name == "mada":
        extra = dict(beta3=0.3, c=0.4, rho=0.6, gamma=0.7)
    opt = O.RuleOptimizer(model.parameters(), O.get_rule(name), lr=1e-2, weight_decay=0.1, state_dtype=state_dtype,
                          **extra)
    opt.chunk_numel = chunk_numel
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return list(model.parameters()), opt


@pytest.mark.parametrize("name", list(O.RULES))
def test_chunked_rule_step_equals_one_chunk_bit_for_bit(name):
    """Every rule (NAdam's scalar buffer, Adan's gradient state, a strided parameter included), in
    chunks of 5 elements (which split tensors and pack several into one), against one chunk."""
    whole_params, whole_opt = _rule_run(name, WHOLE)
    chunked_params, chunked_opt = _rule_run(name, 5)
    for a, b in zip(whole_params, chunked_params):
        assert torch.equal(a, b)
    for sa, sb in zip(whole_opt.state.values(), chunked_opt.state.values()):
        assert sa.keys() == sb.keys()
        for key in sa:
            if key != "step":
                assert torch.equal(sa[key], sb[key]), key


def test_chunked_rule_step_with_a_wider_state_dtype_equals_one_chunk():
    whole, _ = _rule_run("mada", WHOLE, dtype=torch.bfloat16, state_dtype=torch.float32)
    chunked, _ = _rule_run("mada", 3, dtype=torch.bfloat16, state_dtype=torch.float32)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", ["global", "share_tensor", "l2", "strided"])
def test_chunked_hyper_learning_equals_one_chunk(helpers, config):
    """The eager hyper-learning engine's update and vjp in chunks of 7 elements against one chunk:
    the parameters and the states elementwise, the learned coefficients up to the order of the
    hypergradient's sums (float64). ``share_tensor`` puts several coefficient sets in one bucket, so
    a chunk reads per-element coefficients of the tensors it covers."""
    out = {}
    for chunk_numel in (WHOLE, 7):
        model, loss_fns = builtin_problem(8, seed=7)
        if config == "strided":
            model.fc2.weight = nn.Parameter(model.fc2.weight.detach().t().contiguous().t())
        params = list(model.parameters())
        kw = dict(share="tensor") if config == "share_tensor" else {}
        if config == "l2":
            kw["weight_decay_mode"] = "l2"
        # MADA at interior coefficients: its gradient state (g_prev) and x (weight decay) in the record
        opt = H.HyperOptimizer(params, "mada", lr=1e-2, weight_decay=0.1, **kw, **MADA_INTERIOR)
        opt.chunk_numel = chunk_numel
        helpers.train_on(model, opt, loss_fns, loss=lambda m, loss_fn: loss_fn(m))
        out[chunk_numel] = helpers.flat(opt._q), helpers.flat_params(model)
    q_whole, x_whole = out[WHOLE]
    q_chunked, x_chunked = out[7]
    # (the hyper-optimizer, Adam, divides by the hypergradients' second moment: a last-digit change in
    # a hypergradient near 0 shows in the coefficients; the fused path's test allows 1e-10 too)
    assert (q_whole - q_chunked).abs().max().item() <= 1e-10
    assert (x_whole - x_chunked).abs().max().item() <= 1e-10
    assert (q_whole[:len(opt.learn)] - q_whole.new_tensor([float(opt.param_groups[0][n]) for n in opt.learn])
            ).abs().max().item() > 1e-6  # the coefficients moved
