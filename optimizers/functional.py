"""The functional core: pure update functions over flat tensors.

``displacement`` is the whole update of one bucket of parameters as a pure function of the
gradient, the buffers, the parameters and the hyperparameters (0-D tensors allowed everywhere),
so ``torch.func`` can differentiate it with respect to the hyperparameters and ``torch.compile``
can fuse it. ``apply_update`` is its in-place eager use. The optimizers in ``adapter.py`` and the
hyper-gradient engine are thin layers over these functions.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .family import Family

__all__ = ["flatten", "unflatten_like", "displacement", "needs_param", "apply_update"]


def flatten(tensors: Sequence[Tensor], copy: bool = False) -> Tensor:
    """One contiguous 1-D tensor holding ``tensors`` back to back.

    A single contiguous tensor comes back as a view unless ``copy``: the hyper-gradient engine
    keeps the flat tensors as vjp residuals, so they must not alias parameters updated in place.
    """
    if len(tensors) == 1 and not copy:
        return tensors[0].reshape(-1)
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_like(flat: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    """Views of ``flat`` shaped like each tensor of ``like``."""
    chunks = torch.split(flat, [t.numel() for t in like])
    return [c.view(t.shape) for c, t in zip(chunks, like)]


def displacement(family: Family, flat_g: Tensor, state: Mapping[str, Tensor], flat_x: Optional[Tensor],
                 h: Mapping[str, object], t, weight_decay_mode: str, precomputed: Optional[Mapping] = None):
    """The pure update of one bucket: ``(x_t - x_{t-1}, new_state)`` for flat tensors.

    ``h`` holds the family's coefficients plus ``"lr"`` and ``"weight_decay"``; every entry may be a
    0-D tensor that ``torch.func`` differentiates. ``flat_x`` may be ``None`` when neither the rule
    nor the weight decay reads it. Implements (see ``Family``)::

        decoupled:  x_t - x = -lr (d(g) + wd x)
        l2:         x_t - x = -lr d(g + wd x)
        proximal:   x_t - x = (x - lr d(g)) / (1 + lr wd) - x
    """
    lr, wd = h["lr"], h["weight_decay"]
    decay = not (isinstance(wd, (int, float)) and wd == 0)
    if decay and weight_decay_mode == "l2":
        flat_g = flat_g + wd * flat_x
    direction, new_state = family.update(flat_g, state, flat_x, h, t, precomputed)
    if decay and weight_decay_mode == "decoupled":
        delta = -lr * (direction + wd * flat_x)
    elif decay and weight_decay_mode == "proximal":
        delta = (flat_x - lr * direction) / (1 + lr * wd) - flat_x
    else:
        delta = -lr * direction
    return delta, new_state


def needs_param(family: Family, weight_decay, weight_decay_mode: str) -> bool:
    """Whether ``displacement`` reads the flat parameters."""
    return family.uses_param or not (isinstance(weight_decay, (int, float)) and weight_decay == 0)


def apply_update(
    family: Family,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Tensor],
    h: Mapping[str, object],
    lr,
    weight_decay: float,
    weight_decay_mode: str,
    t,
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, Tensor]:
    """One in-place step of ``family`` on a bucket of parameters; returns the new flat buffers.

    ``state`` holds flat buffers (1-D, total numel of ``params``; 0-D for scalar states), ``h`` the
    coefficients, ``t`` the 1-based step count. The update is ``displacement``'s. ``dtype``: compute
    in it (the buffers' dtype) when it differs from the parameters'; the parameters then receive
    ``x + delta`` rounded once to their own dtype.
    """
    # Copies, not views: a new buffer may be the gradient or the parameter itself (Adan's g_prev,
    # a state defined as ``param``), and both are overwritten in place after this step.
    if dtype is None or dtype == params[0].dtype:
        flat_g = flatten(grads, copy=True)
        flat_x = flatten(params, copy=True) if needs_param(family, weight_decay, weight_decay_mode) else None
    else:  # .to(dtype) copies
        flat_g = flatten(grads, copy=grads[0].dtype == dtype).to(dtype)
        flat_x = flatten(params).to(dtype) if needs_param(family, weight_decay, weight_decay_mode) else None
    delta, new_state = displacement(family, flat_g, state, flat_x, {**h, "lr": lr, "weight_decay": weight_decay},
                                    t, weight_decay_mode)
    torch._foreach_add_(list(params), unflatten_like(delta, params))
    return new_state
