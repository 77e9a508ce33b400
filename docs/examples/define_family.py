"""Define a new optimizer family with the DSL, prune it to vertices, and train with it.

"AdaLion" is the convex hull of three update directions, with weights w on the 3-simplex:

    d_t = w[0] * adam_direction + w[1] * lion_direction + w[2] * sgd_momentum_direction

Run: .venv/bin/python docs/examples/define_family.py   (asserts every claim made in docs/dsl.md)
"""
import torch
from torch.func import vjp

from optimizers import (Coef, Coefficient, Family, Interval, Positive, RuleOptimizer, Simplex, State, avgrad,
                        bias_correction, ema, grad, hull, interp, maximum, sign, sqrt, square, step)

# ---------------------------------------------------------------- the family (the <= 20 lines in docs/dsl.md)
BETA = Interval(0.0, 1.0, open_high=True)  # beta = 1 would make a bias correction 1 - beta^t zero


def adalion() -> Family:
    b1, b2, eps, b1l, b2l, mu, w = map(Coef, ["beta1", "beta2", "eps", "beta1_lion", "beta2_lion", "momentum", "w"])
    m, v, lion_m, buf = State("exp_avg"), State("exp_avg_sq"), State("lion_m"), State("momentum_buffer")
    m.define(ema(m.prev, grad, b1))                       # m_t = b1 m_{t-1} + (1 - b1) g_t
    v.define(ema(v.prev, square(grad), b2))               # v_t = b2 v_{t-1} + (1 - b2) g_t^2
    lion_m.define(ema(lion_m.prev, grad, b2l))            # Lion's momentum, updated after use
    buf.define(mu * buf.prev + grad)                      # torch.optim.SGD's buffer (dampening 0)
    adam_d = (m / bias_correction(b1)) / (sqrt(v / bias_correction(b2)) + eps)
    lion_d = sign(interp(lion_m.prev, grad, b1l))         # sign(b1l m_{t-1} + (1 - b1l) g_t): the OLD momentum
    return Family(
        "adalion",
        [Coefficient("beta1", 0.9, BETA), Coefficient("beta2", 0.999, BETA),
         Coefficient("eps", 1e-8, Positive(), learnable=False),
         Coefficient("beta1_lion", 0.9, BETA, learnable=False), Coefficient("beta2_lion", 0.99, BETA, learnable=False),
         Coefficient("momentum", 0.9, Interval(0.0, 1.0)),
         Coefficient("w", (0.8, 0.1, 0.1), Simplex(3), doc="weights of (adam, lion, sgd) directions")],
        hull([adam_d, lion_d, buf], w),
        vertices={"adam": {"w": (1.0, 0.0, 0.0)}, "lion": {"w": (0.0, 1.0, 0.0)}, "sgd": {"w": (0.0, 0.0, 1.0)}},
    )


# ---------------------------------------------------------------- second example: AVGrad's average vs a running max
# v_max = max(v_max, v~), v = rho v~ + (1 - rho) v_max, with v~ AVGrad's running average of v.
def avg_max() -> Family:
    b1, b2, eps, rho = map(Coef, ["beta1", "beta2", "eps", "rho"])
    m, v, v_avg, v_max = State("exp_avg"), State("exp_avg_sq"), State("v_avg"), State("v_max")
    m.define(ema(m.prev, grad, b1))
    v.define(ema(v.prev, square(grad), b2))
    v_avg.define((v + (step - 1) * v_avg.prev) / step)   # AVGrad's average of v_1..v_t
    v_max.define(maximum(v_max.prev, v_avg))             # AMSGrad's running max, of the average
    v_hat = interp(v_avg, v_max, rho)
    return Family("avg_max", [Coefficient("beta1", 0.9, BETA), Coefficient("beta2", 0.999, BETA),
                              Coefficient("eps", 1e-8, Positive(), learnable=False), Coefficient("rho", 0.5)],
                  (m / bias_correction(b1)) / (sqrt(v_hat / bias_correction(b2)) + eps),
                  vertices={"avgrad": {"rho": 1.0}, "max": {"rho": 0.0}})


# ---------------------------------------------------------------- checks of what docs/dsl.md says
def trajectory(make_optimizer, steps=10, seed=0):
    """Parameters after `steps` optimizer steps on a float64 least-squares problem."""
    gen = torch.Generator().manual_seed(seed)
    A, y = torch.randn(8, 5, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)
    x = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))
    opt = make_optimizer([x])
    for _ in range(steps):
        opt.zero_grad()
        ((A @ x - y) ** 2).mean().backward()
        opt.step()
    return x.detach()


def main():
    fam = adalion()
    print(fam)

    # 1. All four buffers are carried; every coefficient is read.
    assert fam.state_names == ("exp_avg", "exp_avg_sq", "lion_m", "momentum_buffer"), fam.state_names
    assert fam.learnable == ("beta1", "beta2", "momentum", "w"), fam.learnable

    # 2. Vertices prune the unused branches, their buffers and their coefficients.
    adam_v, lion_v, sgd_v = fam.vertex("adam"), fam.vertex("lion"), fam.vertex("sgd")
    for f in (adam_v, lion_v, sgd_v):
        print(f"  vertex {f.name:5s} buffers={list(f.state_names)} coefficients={list(f.coefficients)}")
    assert adam_v.state_names == ("exp_avg", "exp_avg_sq")
    assert lion_v.state_names == ("lion_m",)
    assert sgd_v.state_names == ("momentum_buffer",)
    assert list(adam_v.coefficients) == ["beta1", "beta2", "eps"]
    assert list(lion_v.coefficients) == ["beta1_lion", "beta2_lion"]
    assert list(sgd_v.coefficients) == ["momentum"]
    # A face of the simplex (w[2] = 0) keeps the Adam and Lion buffers only.
    assert fam.at(w=(0.5, 0.5, 0.0)).state_names == ("exp_avg", "exp_avg_sq", "lion_m")

    # 3. The vertices are the classic optimizers: float64, 10 steps, 1e-10.
    ours = trajectory(lambda p: RuleOptimizer(p, adam_v, lr=1e-2, betas=(0.9, 0.99)))
    ref = trajectory(lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.99)))
    assert torch.allclose(ours, ref, rtol=0, atol=1e-10), (ours - ref).abs().max()
    ours = trajectory(lambda p: RuleOptimizer(p, sgd_v, lr=1e-2, momentum=0.9))
    ref = trajectory(lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9))
    assert torch.allclose(ours, ref, rtol=0, atol=1e-10), (ours - ref).abs().max()

    # 4. Train a tiny model at an interior point of the simplex.
    torch.manual_seed(0)
    X = torch.randn(256, 4)
    Y = torch.sin(X @ torch.tensor([1.0, -2.0, 0.5, 3.0])).unsqueeze(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = RuleOptimizer(model.parameters(), fam, lr=1e-2, weight_decay=1e-4, w=(0.6, 0.2, 0.2))
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), Y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"  train loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert sorted(opt.state[model[0].weight]) == ["exp_avg", "exp_avg_sq", "lion_m", "momentum_buffer", "step"]

    # 5. h is an explicit argument: the derivative of the direction with respect to w is one vjp.
    g, x = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    state = fam.init_state(x)
    h = {k: torch.tensor(val, dtype=torch.float64) for k, val in fam.defaults().items()}
    t = torch.tensor(1.0, dtype=torch.float64)
    direction, pullback = vjp(lambda hh: fam.update(g, state, x, hh, t)[0], h)
    cot = torch.randn(6, dtype=torch.float64)
    dw = pullback(cot)[0]["w"]
    # The direction is linear in w, so each partial is <cot, branch_i> and one finite difference is exact.
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = 1e-3
        plus = fam.update(g, state, x, {**h, "w": h["w"] + e}, t)[0]
        assert abs(float(cot @ (plus - direction)) / 1e-3 - float(dw[i])) < 1e-8
    print("  d<cot, direction>/dw =", [round(float(z), 4) for z in dw])

    # 6. The second example: rho = 1 prunes the max buffer and is the library's AVGrad.
    fam2 = avg_max()
    assert fam2.state_names == ("exp_avg", "exp_avg_sq", "v_avg", "v_max"), fam2.state_names
    assert fam2.vertex("avgrad").state_names == ("exp_avg", "exp_avg_sq", "v_avg")
    ours = trajectory(lambda p: RuleOptimizer(p, fam2.vertex("avgrad"), lr=1e-2))
    ref = trajectory(lambda p: RuleOptimizer(p, avgrad(), lr=1e-2))
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12), (ours - ref).abs().max()
    print("all checks passed")


if __name__ == "__main__":
    main()
