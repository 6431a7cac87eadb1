"""The Triton kernels (triton_kernels/, installed as fusedce.triton_kernels) behind the backend
interface. CUDA tensors, and CPU tensors through Triton's interpreter (TRITON_INTERPRET=1)."""
from __future__ import annotations

import torch

from . import Backend, check_target_range, interpreting_triton, weight_sum
from ..triton_kernels import cross_entropy as kernels


class TritonBackend(Backend):
    name = "triton"

    def unavailable(self, device):
        # meta tensors: torch.compile traces the Triton ops' kernels on them (no GPU needed to trace)
        if device.type in ("cuda", "meta") or (device.type == "cpu" and interpreting_triton()):
            return None
        return f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got a {device.type} tensor"

    def forward(self, logits, target, weight, opts, grad_loss=None, dlogits=None):
        if not target.is_floating_point():
            check_target_range(target, logits.shape[1], opts.ignore_index)  # CPU (interpreter) only
        rows = logits.shape[0]
        loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        kernels.cross_entropy(logits, target, weight, weight_sum(target, weight), opts, forward=True,
                              grad_loss=None if grad_loss is None else grad_loss.float(), lse=lse, loss=loss,
                              dlogits=dlogits)
        return loss, lse

    def backward_into(self, grad_loss, logits, target, weight, lse, opts, out):
        kernels.cross_entropy(logits, target, weight, weight_sum(target, weight), opts, forward=False,
                              grad_loss=grad_loss.float(), lse=lse, dlogits=out)

    def shard_states(self, logits, target, weight, opts, shard):
        states = torch.empty(logits.shape[0], 4, dtype=torch.float32, device=logits.device)
        kernels.cross_entropy(logits, target, weight, None, opts, forward=True, shard=shard, states=states)
        return states

    def shard_backward_into(self, grad_loss, logits, target, weight, lse, k, opts, shard, out):
        kernels.cross_entropy(logits, target, weight, None, opts, forward=False, grad_loss=grad_loss.float(),
                              lse=lse.float().contiguous(), dlogits=out, shard=shard,
                              target_mass=k.float().contiguous())

    def scale_(self, grad, scale):
        kernels.scale_(grad, scale.float())


BACKEND = TritonBackend()
