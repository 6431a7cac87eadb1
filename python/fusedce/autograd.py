"""The autograd Functions of the eager path; they call the backend's kernels directly (torch.compile
takes the custom ops of fusedce.ops instead, which share input_grads with them).

CrossEntropyFunction: per-row loss and lse, differentiable in the logits and in probability targets:
the kernels' gradient for a plain backward; a differentiable one (fusedce.composite) when the backward
is itself differentiated (create_graph=True) or traced by torch.func; forward-mode AD (jvp) and vmap
rules of its own.

FusedCrossEntropyFunction: a reduced ("mean" or "sum") loss whose gradient the kernel computes in the
forward pass, while each row is in cache: the logits are read once and the gradient written once,
instead of one read for the forward and a read and a write for the backward."""
from __future__ import annotations

import torch

from . import backends, composite
from .errors import InvalidArgument
from .options import Options


def _check_inplace_allowed(logits: torch.Tensor) -> None:
    base = logits
    while base is not None:  # a view of a leaf shares its memory
        if base.is_leaf and base.requires_grad:
            raise RuntimeError("inplace_backward=True overwrites the logits with their gradient, which would "
                               "overwrite a leaf tensor (a parameter or input); use it on logits computed by "
                               "the model")
        base = base._base
    if any(stride == 0 and size > 1 for stride, size in zip(logits.stride(), logits.shape)):
        raise RuntimeError("inplace_backward=True needs logits with their own memory per element, got an "
                           f"expanded tensor (strides {logits.stride()})")


def differentiable_backward(grad) -> bool:
    """Whether a backward given `grad` must compute with tensor ops: create_graph=True (its result is
    differentiated), or a grad the kernels cannot read, wrapped by torch.func (grad, vmap, jacrev) or
    batched by autograd.grad(is_grads_batched=True)."""
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    return torch.is_grad_enabled() or (grad is not None and (functorch.is_functorch_wrapped_tensor(grad)
                                                             or functorch.is_legacy_batchedtensor(grad)))


_SECOND_INPLACE_BACKWARD = ("backward called twice with inplace_backward=True: the first backward handed out the "
                            "logits' memory as their gradient; use inplace_backward=False with retain_graph")
_INPLACE_CREATE_GRAPH = ("inplace_backward=True cannot give a differentiable gradient (create_graph=True, "
                         "torch.func): the logits it would need are overwritten; use inplace_backward=False")


def input_grads(kernels, needs_input_grad, logits, target, weight, lse, grad_loss, grad_lse, opts: Options,
                inplace: bool = False):
    """Gradients of (logits, target, weight) of the per-row loss and lse: the one backward formula of
    CrossEntropyFunction (kernels: a Backend) and of the forward ops' autograd registration (kernels:
    their op-calling twin, fusedce.ops.traceable). grad_loss or grad_lse may be None (unused output)."""
    if needs_input_grad[2]:
        raise RuntimeError("cross_entropy is not differentiable with respect to weight, as in torch: "
                           "pass a weight that does not require grad")
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    if differentiable_backward(grad_loss if grad_lse is None else grad_lse):
        if inplace:
            raise RuntimeError(_INPLACE_CREATE_GRAPH)
        return (composite.logits_grad(grad_loss, grad_lse, logits, target, weight, opts) if needs_input_grad[0]
                else None,
                composite.target_grad(grad_loss, logits, target, weight, opts) if needs_input_grad[1] else None,
                None)
    grad_loss = grad_loss.to(lse.dtype)
    # the terms that read the logits come first: the in-place kernel overwrites them
    dtarget = composite.target_grad(grad_loss, logits, target, weight, opts) if needs_input_grad[1] else None
    dlogits = None
    if needs_input_grad[0]:
        lse_term = None if grad_lse is None else composite.lse_grad(grad_lse, logits, opts)
        dlogits = kernels.backward(grad_loss, logits, target, weight, lse, opts, logits if inplace else None)
        if lse_term is not None:
            dlogits = dlogits.add_(lse_term)
    return dlogits, dtarget, None


class CrossEntropyFunction(torch.autograd.Function):
    """apply(logits [R, V], target, weight, options=Options(), backend="auto", inplace_backward=False)
    -> (loss [R], lse [R]) in the accumulation dtype (fp32, fp64 for fp64 logits). target: int64 class
    indices [R] or probabilities [R, V]; weight: [V] in the accumulation dtype or None; backend: a name
    or a Backend.

    With inplace_backward the backward writes the gradient into the logits' memory instead of a new
    tensor (saves R x V elements). The forward then bumps the logits' version counter, so any other op
    that saved the logits for its backward raises instead of silently using overwritten values."""

    @staticmethod
    def forward(logits, target, weight, options=Options(), backend="auto", inplace_backward=False):
        if isinstance(backend, str):
            backend = backends.resolve(backend, logits.device, logits.dtype)
        return backend.forward(logits, target, weight, options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, options, backend, inplace = (*inputs, *(Options(), "auto", False)[len(inputs) - 3:])
        if isinstance(backend, str):
            backend = backends.resolve(backend, logits.device, logits.dtype)
        ctx.args = (options, backend, bool(inplace))
        if inplace:
            _check_inplace_allowed(logits)
            torch.autograd.graph.increment_version(logits)
            ctx.logits = logits  # not in save_for_backward: its version check would trip on our own bump
            ctx.save_for_backward(target, weight, output[1])
        else:
            ctx.save_for_backward(logits, target, weight, output[1])
        ctx.save_for_forward(logits, target, weight)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        options, backend, inplace = ctx.args
        if inplace:
            if ctx.logits is None:
                raise RuntimeError(_SECOND_INPLACE_BACKWARD)
            logits, (target, weight, lse) = ctx.logits, ctx.saved_tensors
            ctx.logits = None
        else:
            logits, target, weight, lse = ctx.saved_tensors
        grads = input_grads(backend, ctx.needs_input_grad, logits, target, weight, lse, grad_loss, grad_lse, options,
                            inplace)
        return grads + (None,) * 3

    @staticmethod
    def jvp(ctx, logits_t, target_t, *_):
        """Forward-mode AD: the directional derivatives of loss and lse, from the differentiable gradient."""
        logits, target, weight = ctx.saved_tensors  # those of save_for_forward
        options = ctx.args[0]
        dloss, dlse = composite.row_gradients(logits, target, weight, options)
        loss_t = torch.zeros(logits.shape[:-1], dtype=dloss.dtype, device=logits.device)
        lse_t = torch.zeros_like(loss_t)
        if logits_t is not None:
            loss_t = loss_t + (dloss * logits_t.to(dloss.dtype)).sum(-1)
            lse_t = lse_t + (dlse * logits_t.to(dlse.dtype)).sum(-1)
        if target_t is not None and target.is_floating_point():
            one = torch.ones_like(loss_t)
            loss_t = loss_t + (composite.target_grad(one, logits, target, weight, options).to(dloss.dtype)
                               * target_t.to(dloss.dtype)).sum(-1)
        return loss_t, lse_t

    @staticmethod
    def vmap(info, in_dims, logits, target, weight, options=Options(), backend="auto", inplace_backward=False):
        """vmap folds the mapped dimension into the rows: one kernel call for the whole batch."""
        logits_dim, target_dim, weight_dim = in_dims[:3]
        if weight_dim is not None:
            raise InvalidArgument("vmap over the class weight is not supported: map over logits and targets")
        batch = info.batch_size

        def rows(t, dim):
            t = t.movedim(dim, 0) if dim is not None else t.expand(batch, *t.shape)
            return t.reshape(batch * t.shape[1], *t.shape[2:])

        x = rows(logits, logits_dim)
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            x = x.contiguous()
        t = rows(target, target_dim).contiguous()
        loss, lse = CrossEntropyFunction.apply(x, t, weight, options, backend, False)
        return (loss.view(batch, -1), lse.view(batch, -1)), (0, 0)


class FusedCrossEntropyFunction(torch.autograd.Function):
    """apply(logits [R, V], target, weight, options, backend, reduction, out_dtype, inplace) -> the
    "mean" or "sum" loss (0-d, out_dtype), its gradient computed in the forward for grad_output 1 and
    rescaled in place by the backward, which returns at once when grad_output is 1 (checked on the
    device for GPU tensors: no host sync). The gradient's memory is taken at the forward.

    A second backward through a retained graph runs the same fused kernel again, so it hands out the
    same gradient bit for bit (gradcheck's reentrancy check); a differentiated backward
    (create_graph=True) gets the differentiable gradient of fusedce.composite."""

    @staticmethod
    def forward(ctx, logits, target, weight, options, backend, reduction, out_dtype, inplace):
        if inplace:
            _check_inplace_allowed(logits)
            dlogits = logits
        else:  # dense, as the kernels write it (empty_like is the cheapest allocation on small inputs)
            dlogits = torch.empty_like(logits) if logits.is_contiguous() else torch.empty(
                logits.shape, dtype=logits.dtype, device=logits.device)
        loss = backend.reduced(logits, target, weight, options, reduction, out_dtype, dlogits)
        if inplace:
            torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(None if inplace else logits, target, weight)
        ctx.dlogits = dlogits
        ctx.args = (options, backend, reduction, out_dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        options, backend, reduction, out_dtype = ctx.args
        logits, target, weight = ctx.saved_tensors
        dlogits, ctx.dlogits = ctx.dlogits, None
        differentiable = differentiable_backward(grad_output)
        if logits is None and (dlogits is None or differentiable):
            raise RuntimeError(_INPLACE_CREATE_GRAPH if dlogits is not None else _SECOND_INPLACE_BACKWARD)
        if differentiable:
            scale = grad_output if reduction == "sum" else grad_output / backend.mean_denominator(
                target, weight, options.ignore_index)
            dlogits = composite.logits_grad(scale.expand(logits.shape[0]), None, logits, target, weight, options)
            return dlogits, None, None, None, None, None, None, None
        if dlogits is None:  # a retained graph's second backward
            dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            backend.reduced(logits, target, weight, options, reduction, out_dtype, dlogits)
        backend.scale_(dlogits, grad_output)
        return dlogits, None, None, None, None, None, None, None
