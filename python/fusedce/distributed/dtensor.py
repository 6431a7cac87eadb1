"""fusedce.cross_entropy on a DTensor whose classes are sharded (Shard(-1) of [N, C], Shard(1) of
[N, C, d1..]) on a one-dimensional mesh: the vocab-parallel loss of each rank's local shard, returned
as torch's loss_parallel returns it, a replicated DTensor; the logits are never redistributed. The
target may be a tensor or a replicated DTensor, the class weight a full [C] tensor or replicated
DTensor. Any other placement raises: redistribute the logits first (logits.redistribute(mesh,
[Shard(class_dim)]) or .full_tensor()) to choose what moves."""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..errors import InvalidArgument
from .loss import vocab_parallel_cross_entropy


def _replicated(x, name: str):
    if not isinstance(x, DTensor):
        return x
    if not all(p.is_replicate() for p in x.placements):
        raise InvalidArgument(f"{name} must be replicated (a tensor or a DTensor placed Replicate()), got "
                              f"placements {x.placements}")
    return x.to_local()


def cross_entropy(input: DTensor, target, weight, inplace_backward: bool, **kwargs):
    """kwargs: those of vocab_parallel_cross_entropy (the options, reduction, return_lse, fused, backend, dtype)."""
    if inplace_backward:
        raise InvalidArgument("inplace_backward is not supported for DTensor logits")
    mesh, placements = input.device_mesh, input.placements
    class_dim = 1 if input.dim() > 1 else 0
    if mesh.ndim != 1 or not (isinstance(placements[0], Shard) and placements[0].dim % input.dim() == class_dim):
        raise InvalidArgument(f"fusedce.cross_entropy takes a DTensor sharded on its class dimension ({class_dim}) "
                              f"on a one-dimensional mesh, got placements {placements} on a {mesh.ndim}-D mesh: "
                              f"redistribute it to [Shard({class_dim})] first")
    # DTensor's Shard splits as torch.chunk does; the combine checks this offset against the exchanged sizes
    sizes = [len(c) for c in torch.arange(input.shape[class_dim]).chunk(mesh.size())]
    rank = mesh.get_local_rank()
    start = sum(sizes[:rank])
    weight = _replicated(weight, "weight")
    if weight is not None:  # the full [C] weight: this rank's slice
        weight = weight[start:start + input.to_local().shape[class_dim]]
    loss = vocab_parallel_cross_entropy(input.to_local(), _replicated(target, "target"), weight,
                                        group=mesh.get_group(), vocab_start=start, **kwargs)
    if isinstance(loss, tuple):  # with return_lse
        return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in loss)
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)
