"""Define a new optimizer family and learn its coefficients while a model trains (docs/learn_a_family.md).

"AdaLion-avg": Adam's direction with a second moment interpolated between Adam's EMA and AVGrad's
running average, mixed with a Lion-style sign direction that reuses Adam's first moment m:

    m_t  = b1 m + (1 - b1) g                    v_t = b2 v + (1 - b2) g^2
    a_t  = (v_t + (t - 1) a_{t-1}) / t          (AVGrad's average of v_1..v_t)
    v^   = rho v_t + (1 - rho) a_t              rho = 1: Adam, rho = 0: AVGrad
    d_t  = gamma (m_t/bc1) / (sqrt(v^/bc2) + eps) + (1 - gamma) sign(bL m_{t-1} + (1 - bL) g)

Learned: beta1, beta2, rho, gamma (by a hyper-level Adam); eps and bL fixed. Then every learned
coefficient's hypergradient is checked against central finite differences.

Run: .venv/bin/python docs/examples/learn_family.py
"""
import copy

import torch

import hypergrad
from hypergrad.gradcheck import check_hypergradients
from optimizers import (Beta, Coef, Coefficient, Family, Interval, Positive, State, adaptive_direction,
                        bias_correction, ema_state, grad, interp, sign, square, step)


# ---------------------------------------------------------------- 1. the family (doc snippet 1)
def adalion_avg() -> Family:
    b1, b2, rho, gamma, eps, bL = map(Coef, ["beta1", "beta2", "rho", "gamma", "eps", "beta_lion"])
    m = ema_state("m", grad, b1)                           # Adam's first moment (Lion reads m.prev)
    v = ema_state("v", square(grad), b2)                   # Adam's second moment
    avg = State("v_avg")
    avg.define((v + (step - 1) * avg.prev) / step)         # AVGrad's running average of v
    adam_d = adaptive_direction(m / bias_correction(b1), interp(v, avg, rho), b2, eps)
    lion_d = sign(interp(m.prev, grad, bL))                # sign(bL m_{t-1} + (1 - bL) g)
    return Family(
        "adalion_avg",
        [Coefficient("beta1", 0.9, Interval(0.5, 0.99)), Coefficient("beta2", 0.99, Interval(0.9, 0.9999)),
         Coefficient("rho", 0.5, Interval(0.0, 1.0)), Coefficient("gamma", 0.8, Interval(0.0, 1.0)),
         Coefficient("eps", 1e-8, Positive(), learnable=False),
         Coefficient("beta_lion", 0.9, Beta(), learnable=False)],
        interp(adam_d, lion_d, gamma),
        vertices={"adam": {"rho": 1.0, "gamma": 1.0}, "avgrad": {"rho": 0.0, "gamma": 1.0}, "lion": {"gamma": 0.0}},
    )


family = adalion_avg()
assert family.learnable == ("beta1", "beta2", "rho", "gamma")
assert family.state_names == ("m", "v", "v_avg")                 # Lion's momentum is Adam's m: no extra buffer
assert family.vertex("adam").state_names == ("m", "v")            # AVGrad's average pruned
assert family.vertex("lion").state_names == ("m",)
assert list(family.vertex("lion").coefficients) == ["beta1", "beta_lion"]
graph = hypergrad.family_graph(family)                            # the picture's graph (hypergrad.draw writes a PNG)
assert sorted(d["name"] for _, d in graph.nodes(data=True) if d["kind"] == "state") == ["m", "v", "v_avg"]

# ---------------------------------------------------------------- 2. learn it (doc snippet 2)
torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
X = torch.randn(512, 8, generator=gen, dtype=torch.float64)
w = torch.randn(8, 1, generator=gen, dtype=torch.float64) / 3
Y = torch.sin(X @ w) + 0.05 * torch.randn(512, 1, generator=gen, dtype=torch.float64)    # y = sin(x.w) + noise
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).double()

opt = hypergrad.HyperOptimizer(model.parameters(), family, lr=1e-2, weight_decay=1e-4,
                               tower=hypergrad.Level("adam", lr=1e-2))
losses = []
for i in range(100):
    idx = torch.randint(0, 512, (64,), generator=gen)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X[idx]), Y[idx])
    loss.backward()
    opt.step()
    losses.append(loss.item())

learned = {k: round(v.item(), 4) for k, v in opt.coefficients().items()}
print("learned coefficients:", learned)
print("last hypergradients: ", {k: f"{v.item():+.3e}" for k, v in opt.hypergradients().items()})
first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
print(f"mean loss, first 10 steps {first:.4f} -> last 10 steps {last:.4f}")
assert last < 0.5 * first
assert learned != {"beta1": 0.9, "beta2": 0.99, "rho": 0.5, "gamma": 0.8}    # the coefficients moved
for name, value in opt.coefficients().items():                              # ... and stayed in their domains
    assert family.coefficients[name].domain.contains(value.item()), (name, value)

# ---------------------------------------------------------------- 3. check its hypergradients (doc snippet 3)
batches = [torch.randint(0, 512, (64,), generator=gen) for _ in range(6)]
loss_fns = [lambda m, idx=idx: torch.nn.functional.mse_loss(m(X[idx]), Y[idx]) for idx in batches]
point = {k: v.item() for k, v in opt.coefficients().items()}          # at the learned coefficients
checks = check_hypergradients(copy.deepcopy(model), loss_fns, family, point, lr=1e-2, weight_decay=1e-4)
for c in checks:
    print(f"{c.name:>6}  engine {c.engine:+.6e}  finite difference {c.finite_difference:+.6e}  "
          f"relative error {c.relative_error:.1e}")
assert [c.name for c in checks] == ["beta1", "beta2", "rho", "gamma"]
assert all(c.engine != 0.0 and c.relative_error <= 1e-6 for c in checks), checks
print("all hypergradients agree with finite differences to <= 1e-6 relative")
