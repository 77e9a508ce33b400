"""The plain-C traffic loops of table (g) (``experiments.traffic``) compute what they stand for.

Oracles: ``torch.optim.AdamW`` for the AdamW loop; float64 sums and ``bench_step._rule_io`` (the
traffic-only kernel that Inductor compiles) for the others."""
import pytest
import torch

from experiments import bench_step
from hypergrad.native import mada_kernels_available

pytestmark = pytest.mark.skipif(not mada_kernels_available(), reason="no C compiler: the loops are not built")

N = 100_003  # not a multiple of the vector width, the 4096-element chunk or the thread count


def _loops(states=6, threads=None):
    from experiments.traffic import TrafficLoops
    return TrafficLoops(states, threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_adamw_loop_equals_torch_adamw(threads):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(N, generator=gen)
    param = torch.nn.Parameter(p0.clone())
    reference = torch.optim.AdamW([param], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=False)
    p, m, v = p0.clone(), torch.zeros(N), torch.zeros(N)
    loops = _loops(threads=threads)
    for step in range(1, 4):
        g = torch.randn(N, generator=gen) * 1e-2
        param.grad = g.clone()
        reference.step()
        loops.adamw(p, g, m, v, lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, step=step)
    state = reference.state[param]
    # float32, the same operations in another order here and there: a few roundings of the update (~lr) apart;
    # a wrong bias correction or decay would be off by ~1e-4
    torch.testing.assert_close(p, param.detach(), rtol=1e-6, atol=1e-8)
    # (torch's lerp fuses a multiply-add: m, ~1e-2, a rounding apart where it nearly cancels)
    torch.testing.assert_close(m, state["exp_avg"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(v, state["exp_avg_sq"], rtol=1e-6, atol=1e-13)
    assert not torch.equal(p, p0)


@pytest.mark.parametrize("states, threads", [(6, 1), (6, 2), (2, 2)])
def test_traffic_loops_compute_their_sums_and_updates(states, threads):
    gen = torch.Generator().manual_seed(1)
    x0, g, g_old = (torch.randn(N, generator=gen) * s for s in (1.0, 1e-2, 1e-2))
    s0 = [torch.rand(N, generator=gen) * 1e-4 for _ in range(states)]
    loops = _loops(states, threads)

    sums = loops.vjp_io(g, g_old, s0)
    w = g.double()
    expected = torch.stack([(w * (s0[0].double() + g_old.double())).sum()] + [(w * s.double()).sum() for s in s0[1:]])
    assert sums.dtype == torch.float64 and sums.shape == (states,)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=0)

    x, st = x0.clone(), [s.clone() for s in s0]
    loops.rule_io(x, g, st)
    x_ref, st_ref = x0.clone(), [s.clone() for s in s0]
    bench_step._rule_io(x_ref, g, *st_ref)  # the traffic-only kernel it stands next to, in torch
    torch.testing.assert_close(x, x_ref, rtol=1e-6, atol=0)
    for a, b in zip(st, st_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)

    x_h, st_h = x0.clone(), [s.clone() for s in s0]
    sums_h = loops.hyper_io(x_h, g, g_old, st_h)  # the reduction on the state as it was, then the update
    assert torch.equal(sums_h, sums) and torch.equal(x_h, x) and all(torch.equal(a, b) for a, b in zip(st_h, st))


def test_traffic_loops_reject_what_they_do_not_take():
    with pytest.raises(ValueError, match="states must be an int"):
        _loops(0)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        _loops(6, threads=0)
    loops = _loops(2)
    x, g = torch.zeros(8), torch.zeros(8)
    with pytest.raises(ValueError, match="expected 2 state buffers, got 3"):
        loops.rule_io(x, g, [torch.zeros(8)] * 3)
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor of 8 elements, got torch.float64"):
        loops.vjp_io(g, g, [torch.zeros(8, dtype=torch.float64), torch.zeros(8)])
    with pytest.raises(ValueError, match="of 8 elements, got torch.float32 on cpu, 4 elements"):
        loops.rule_io(x, g, [torch.zeros(8), torch.zeros(4)])
    with pytest.raises(ValueError, match="contiguous=False"):
        loops.adamw(x, g, torch.zeros(16)[::2], torch.zeros(8), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=0.0, step=1)
