"""MADA's *first* parameterization, declared with the public DSL: AMSGrad's running max in place of
AVGrad's average (design.md §2.2, last paragraph). This is the proof that a user can write their
own family: nothing below reaches into the library's private code.

    m_t    = b1 m + (1 - b1) g
    n_t    = b3 n + (1 - b3) (g - g_prev)                       g_prev = 0 at t = 1
    g^2    = (g + b3 (g - g_prev))^2                            Adan's look-ahead gradient, squared
    vbar_t = b2 vbar + (1 - b2) [c g^2 + (1 - c)(vbar + g^2 sign(g^2 - vbar))]    c = 1 Adam, 0 Yogi
    vmax_t = max(vmax_{t-1}, vbar_t)                            AMSGrad's running max of the EMA
    v_t    = rho vbar_t + (1 - rho) vmax_t                      rho = 1 Adam, rho = 0 AMSGrad
    d_t    = gamma (m_t/bc1 + b3 n_t) / (sqrt(v_t/bc2) + eps) + (1 - gamma) sign(u_t)
    u_t    = b1L mL_{t-1} + (1 - b1L) g,   mL_t = b2L mL + (1 - b2L) g                  (Lion)

Run: .venv/bin/python docs/examples/mada_amsgrad.py   (it checks itself against torch.optim.Adam)
"""
import torch

from optimizers import (Coef, Coefficient, Family, Interval, Positive, RuleOptimizer, State, adaptive_direction,
                        bias_correction, ema, ema_state, grad, interp, mada, maximum, sign, square)

UNIT = Interval(0.0, 1.0)
BETA = Interval(0.0, 1.0, open_high=True)  # beta = 1 would zero a bias correction 1 - beta^t


def mada_amsgrad() -> Family:
    """MADA with AMSGrad's max (the paper's first parameterization); vertices are the classic rules."""
    b1, b2, b3, c, rho, gamma, eps, b1L, b2L = map(
        Coef, ["beta1", "beta2", "beta3", "c", "rho", "gamma", "eps", "beta1_lion", "beta2_lion"])

    g_prev = State("g_prev", definition=grad)         # carries g_{t-1} (0 before the first step)
    diff = grad - g_prev.prev
    m = ema_state("m", grad, b1)                      # first moment
    n = ema_state("n", diff, b3)                      # Adan's EMA of gradient differences
    g_hat2 = square(grad + b3 * diff)

    v_bar = State("v_bar")                            # second moment: Adam (c=1) <-> Yogi (c=0) target
    yogi_target = v_bar.prev + g_hat2 * sign(g_hat2 - v_bar.prev)
    v_bar.define(ema(v_bar.prev, interp(g_hat2, yogi_target, c), b2))
    v_max = State("v_max")                            # AMSGrad: never let the second moment shrink
    v_max.define(maximum(v_max.prev, v_bar))
    v = interp(v_bar, v_max, rho)                     # rho=1 Adam, rho=0 AMSGrad

    # (m/bc1 + b3 n) / (sqrt(v/bc2) + eps), bias corrections with the current betas
    adaptive = adaptive_direction(m / bias_correction(b1) + b3 * n, v, b2, eps)
    lion_m = ema_state("lion_m", grad, b2L)           # Lion's momentum; its sign uses the OLD value
    direction = interp(adaptive, sign(interp(lion_m.prev, grad, b1L)), gamma)

    return Family(
        "mada_amsgrad",
        [Coefficient("beta1", 0.9, Interval(0.0, 0.999)), Coefficient("beta2", 0.95, Interval(0.5, 0.9999)),
         Coefficient("beta3", 0.0, Interval(0.0, 0.99)), Coefficient("c", 1.0, UNIT),
         Coefficient("rho", 0.6, UNIT), Coefficient("gamma", 1.0, UNIT),
         Coefficient("beta1_lion", 0.95, BETA, learnable=False), Coefficient("beta2_lion", 0.98, BETA, learnable=False),
         Coefficient("eps", 1e-8, Positive(), learnable=False)],
        direction,
        vertices={"adam": dict(beta3=0.0, c=1.0, rho=1.0, gamma=1.0),
                  "amsgrad": dict(beta3=0.0, c=1.0, rho=0.0, gamma=1.0),
                  "yogi": dict(beta3=0.0, c=0.0, rho=1.0, gamma=1.0),
                  "adan": dict(c=1.0, rho=1.0, gamma=1.0),
                  "lion": dict(gamma=0.0)},
    )


# ---------------------------------------------------------------- self-checks (run as a script)
def trajectory(make_optimizer, steps=20):
    """Parameters after ``steps`` steps of a float64 two-layer net (4 tensors) on a fixed batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    opt = make_optimizer(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assert_same(ours, ref, what, tol=1e-10):
    diff = (ours - ref).abs().max().item()
    print(f"  {what:58s} max abs diff {diff:.1e}")
    assert diff <= tol, (what, diff)


def main():
    fam = mada_amsgrad()
    print(fam)
    # Vertices prune what they cannot reach: AMSGrad keeps v_max, Adam does not.
    assert fam.vertex("amsgrad").state_names == ("m", "v_bar", "v_max"), fam.vertex("amsgrad").state_names
    assert fam.vertex("adam").state_names == ("m", "v_bar"), fam.vertex("adam").state_names
    assert fam.vertex("lion").state_names == ("lion_m",), fam.vertex("lion").state_names

    lr, betas = 1e-2, (0.9, 0.999)
    adam_point = dict(beta3=0.0, c=1.0, gamma=1.0)
    amsgrad = trajectory(lambda p: torch.optim.Adam(p, lr=lr, betas=betas, amsgrad=True))
    adam = trajectory(lambda p: torch.optim.Adam(p, lr=lr, betas=betas))
    assert (amsgrad - adam).abs().max() > 1e-6, "the check below could not tell AMSGrad from Adam"

    # rho = 0 (with beta3 = 0, c = 1, gamma = 1) is torch's AMSGrad: the whole family, evaluated at
    # those values, and its pruned vertex.
    assert_same(trajectory(lambda p: RuleOptimizer(p, fam, lr=lr, betas=betas, rho=0.0, **adam_point)), amsgrad,
                "family at rho=0, beta3=0, c=1, gamma=1 vs Adam(amsgrad=True)")
    assert_same(trajectory(lambda p: RuleOptimizer(p, fam.vertex("amsgrad"), lr=lr, betas=betas)), amsgrad,
                "vertex 'amsgrad' vs Adam(amsgrad=True)")

    # rho = 1 is Adam: torch's, and MADA's Adam vertex.
    ours = trajectory(lambda p: RuleOptimizer(p, fam, lr=lr, betas=betas, rho=1.0, **adam_point))
    assert_same(ours, adam, "family at rho=1, beta3=0, c=1, gamma=1 vs torch Adam")
    assert_same(ours, trajectory(lambda p: RuleOptimizer(p, mada().vertex("adam"), lr=lr, betas=betas)),
                "family at rho=1, beta3=0, c=1, gamma=1 vs MADA's Adam vertex")

    # Off the Adam point too, rho = 1 removes the max: it is the final MADA at rho = 1.
    interior = dict(beta1=0.85, beta2=0.97, beta3=0.3, c=0.4, gamma=0.7, rho=1.0)
    assert_same(trajectory(lambda p: RuleOptimizer(p, fam, lr=lr, weight_decay=0.1, **interior)),
                trajectory(lambda p: RuleOptimizer(p, mada(), lr=lr, weight_decay=0.1, **interior)),
                "family at rho=1, interior point vs optimizers.mada()")
    print("all checks passed")


if __name__ == "__main__":
    main()
