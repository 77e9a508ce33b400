"""Multi-step truncated unrolls: d F(x_k) / d q through k whole optimizer steps.

The one-step hypergradient (``HyperOptimizer``) holds the optimizer state and the gradient
fixed. The unrolled mode differentiates through everything for k steps, as
``higher.innerloop_ctx`` does:

    x_0 = model parameters,  s_0 = fresh state
    g_i = grad F_i(x_{i-1})           (create_graph: g_i depends on x_{i-1}, hence on q)
    x_i, s_i = x_{i-1} + Delta(q; g_i, s_{i-1}, x_{i-1}),   i = 1..k
    hypergradient = d F_{k+1}(x_k) / d q

It costs k forward/backward passes kept in memory, so it is a research tool (horizon studies,
checking the greedy one-step approximation), not the training loop.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from optimizers import Family, get_rule
from optimizers.adapter import displacement, flatten, unflatten_like

__all__ = ["unrolled_hypergradients"]


def unrolled_hypergradients(
    model: nn.Module,
    family: Family | str,
    batches: Sequence[Tuple[object, object]],
    criterion: Callable[[Tensor, object], Tensor],
    coefficients: Optional[Mapping[str, float]] = None,
    learn: Optional[Sequence[str]] = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    weight_decay_mode: Optional[str] = None,
) -> Tuple[float, Dict[str, float]]:
    """Hypergradients of the loss after ``len(batches) - 1`` unrolled steps.

    Args:
        model: its current parameters are x_0 (the model is not modified).
        family: the rule (a ``Family`` or a registered name).
        batches: ``(inputs, targets)`` pairs; the first k drive the k steps, the last one is the
            evaluation batch F_{k+1}.
        criterion: ``criterion(model(inputs), targets)`` is the loss.
        coefficients: coefficient values (default: the family's).
        learn: names to differentiate (default: the family's learnable ones); may include ``"lr"``.
    Returns:
        ``(final loss, {name: dF/dq_name})``.
    """
    family = get_rule(family) if isinstance(family, str) else family
    if len(batches) < 2:
        raise ValueError(f"batches needs at least 2 entries (k >= 1 steps, then the evaluation batch), got {len(batches)}")
    values = {**family.defaults(), **dict(coefficients or {})}
    unknown = set(values) - set(family.coefficients)
    if unknown:
        raise ValueError(f"unknown coefficient(s) {sorted(unknown)} for {family.name!r}")
    for name, value in values.items():
        family.coefficients[name].validate(value)
    learn = tuple(family.learnable if learn is None else learn)
    bad = [n for n in learn if n != "lr" and n not in family.coefficients]
    if bad:
        raise ValueError(f"learn: {bad} are not coefficients of {family.name!r}")
    mode = family.weight_decay_mode if weight_decay_mode is None else weight_decay_mode

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = params[0].dtype
    q = torch.tensor([float(lr) if n == "lr" else float(values[n]) for n in learn], dtype=dtype, requires_grad=True)
    h: Dict[str, object] = {n: values[n] for n in family.coefficients}
    h.update({"lr": lr, "weight_decay": weight_decay})
    h.update({n: q[i] for i, n in enumerate(learn)})

    def loss_at(flat_x: Tensor, batch) -> Tensor:
        tensors = dict(zip(names, unflatten_like(flat_x, params)))
        inputs, targets = batch
        return criterion(torch.func.functional_call(model, tensors, (inputs,)), targets)

    with torch.enable_grad():
        flat_x = flatten([p.detach() for p in params], copy=True).requires_grad_(True)
        state = family.init_state(flat_x.detach())
        for i, batch in enumerate(batches[:-1]):
            (flat_g,) = torch.autograd.grad(loss_at(flat_x, batch), flat_x, create_graph=True)
            delta, state = displacement(family, flat_g, state, flat_x, h, float(i + 1), mode)
            flat_x = flat_x + delta
        final = loss_at(flat_x, batches[-1])
        if not learn:
            return float(final.detach()), {}
        (grad_q,) = torch.autograd.grad(final, q)
    return float(final.detach()), {n: float(grad_q[i]) for i, n in enumerate(learn)}
