"""DTensor parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``): the optimizers work on local shards.

Every update rule of the toolkit is elementwise, so a rank can update its own shard of a sharded
parameter with the shard of the gradient and shards of the buffers, exactly as one process would
update those elements. The flat-buffer optimizers therefore take ``p.to_local()`` and
``p.grad.to_local()`` (views: in-place writes reach the DTensor's storage) and size their buffers
by the *local* number of elements. Only a sum over all elements (the hypergradient) needs
communication; ``reduction_group`` says over which process group.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["is_dtensor", "local", "locals_of", "check_param", "check_grad", "is_sharded", "reduction_group"]


def _dtensor_class():
    """``DTensor`` if ``torch.distributed.tensor`` has been imported, else None. Not importing it here keeps
    ``import optimizers`` light (it costs ~0.7 s); a DTensor cannot exist before its module is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(t) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The rank-local shard of a DTensor (a view of its storage), or ``t`` itself."""
    if is_dtensor(t):
        with torch.no_grad():
            return t.to_local()
    return t


def locals_of(tensors: Sequence[Tensor]) -> List[Tensor]:
    return [local(t) for t in tensors]


def _placement_kind(pl) -> Optional[str]:
    """``"shard"`` / ``"replicate"`` for the placements an elementwise update supports, else None."""
    from torch.distributed.tensor import Replicate, Shard
    if type(pl) is Shard:
        return "shard"
    if type(pl) is Replicate:
        return "replicate"
    return None


def check_param(p: Tensor, where: str):
    """A DTensor parameter must hold real values on each rank: Shard or Replicate, not Partial."""
    if not is_dtensor(p):
        return
    from torch.distributed.tensor import Replicate, Shard
    bad = [pl for pl in p.placements if not (isinstance(pl, Shard) or isinstance(pl, Replicate))]
    if bad:
        raise ValueError(f"{where} is a DTensor with placements {tuple(p.placements)}; only Shard and Replicate "
                         f"placements can be optimized (a Partial parameter holds no values of its own)")


def check_grad(p: Tensor, where: str):
    """The gradient of a DTensor parameter must be a DTensor laid out like it (a shard per shard)."""
    g = p.grad
    if not is_dtensor(g):
        raise ValueError(f"{where} is a DTensor but its gradient is a {type(g).__name__}; the gradient must be a "
                         f"DTensor with the parameter's placements {tuple(p.placements)}")
    if tuple(g.placements) != tuple(p.placements) or g.device_mesh != p.device_mesh:
        raise ValueError(f"{where}: the gradient's placements {tuple(g.placements)} differ from the parameter's "
                         f"{tuple(p.placements)} (a Partial gradient has not been reduced yet); reduce it first")
    if local(g).shape != local(p).shape:
        raise ValueError(f"{where}: local gradient shape {tuple(local(g).shape)} differs from the local parameter "
                         f"shape {tuple(local(p).shape)}")


def is_sharded(p: Tensor) -> bool:
    """Whether each rank holds a different part of ``p`` (a Shard placement)."""
    if not is_dtensor(p):
        return False
    from torch.distributed.tensor import Shard
    return any(isinstance(pl, Shard) for pl in p.placements)


def reduction_group(params: Sequence[Tensor], what: str) -> Tuple[Optional[object], bool]:
    """``(process group, any sharded)`` for a sum over all elements of ``params``; ``(None, False)`` without DTensors.

    A hypergradient is a sum over every element of every parameter. Each rank sums its local
    elements; the partial sums of Shard-placed parameters are then added across the ranks of the
    mesh (one all-reduce), while a Replicate-placed parameter, identical on every rank, is counted
    once. That needs every parameter on one 1-D mesh with Shard or Replicate placements; anything
    else is refused here. Plain tensors cannot be mixed with DTensors: whether their gradients agree
    across ranks is unknown, and if they do not the ranks' coefficients would drift apart.
    """
    flags = [is_dtensor(p) for p in params]
    if not any(flags):
        return None, False
    if not all(flags):
        plain = [i for i, f in enumerate(flags) if not f]
        raise ValueError(f"{what}: parameters {plain[:8]} are plain tensors while the others are DTensors; learning "
                         f"coefficients from a mix is not supported (shard every parameter, e.g. fully_shard the "
                         f"root module, or give the plain ones to another optimizer)")
    mesh = params[0].device_mesh
    for i, p in enumerate(params):
        if p.device_mesh != mesh:
            raise ValueError(f"{what}: parameter {i} lives on device mesh {p.device_mesh}, parameter 0 on {mesh}; "
                             f"the hypergradient all-reduce needs every parameter on one mesh")
        if p.device_mesh.ndim != 1:
            raise ValueError(f"{what}: parameter {i} lives on a {p.device_mesh.ndim}-D device mesh; only 1-D meshes "
                             f"(FSDP2 or replicated data parallelism) are supported when learning coefficients")
        kinds = [_placement_kind(pl) for pl in p.placements]
        if None in kinds:
            raise ValueError(f"{what}: parameter {i} has placements {tuple(p.placements)}; only Shard(dim) and "
                             f"Replicate() are supported when learning coefficients")
    return mesh.get_group(), any(is_sharded(p) for p in params)
