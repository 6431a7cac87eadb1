"""fusedce in Hugging Face transformers' causal language models, one model instance at a time.

    from fusedce.integrations.transformers import apply_fusedce
    apply_fusedce(model)    # then train as before: your own loop, transformers.Trainer, TRL

Everything is set on the instance (never its class, never torch) and undone by remove_fusedce(model):

- The loss path: `model.loss_function`, transformers' per-instance hook that the model's forward calls
  with the logits, becomes fusedce.cross_entropy with the semantics of transformers' ForCausalLMLoss:
  token t predicts labels[t + 1] (or shift_labels[t] when given), ignore_index -100, and with
  num_items_in_batch the summed loss divided by it, so that gradient accumulation gives the gradients
  of one large batch.
- The fused path (fused_linear=True, models in FUSED_MODELS): a call in training (model.training, grad
  enabled) with labels runs the model's own forward without labels, while its LM head computes
  fusedce.linear_cross_entropy of the hidden states it is given (after logits_to_keep) and its weight
  and bias, instead of the logits, and hands back an empty [..., 0] placeholder; the output then has
  that loss and logits None. The loss is computed inside the head's call so that whatever wraps the
  head (FSDP's gather of its weight, offloading hooks) is in force. All other calls (eval, no_grad,
  generation, no labels) run the unchanged forward, whose loss, with labels, is the loss path's.

The fused path relies on the model's forward doing nothing to the logits between the head and the loss
except the softcap that FUSED_MODELS names: a model not listed there (where the forward may scale the
logits or add an auxiliary loss) gets the loss path, with a warning."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
import warnings
from typing import Any, Optional

import torch
import transformers
from packaging.version import Version
from transformers.loss.loss_utils import ForCausalLMLoss

import fusedce

# The transformers versions tested (>= first, < second); the `hf` extra in pyproject.toml pins the same.
SUPPORTED_VERSIONS = (Version("5.0.0"), Version("5.25.0"))

# Causal LM classes whose forward computes `logits = lm_head(hidden_states[logits_to_keep])`, then at most
# a softcap, then `loss_function(logits, labels, ...)`, each checked against the unpatched model in
# tests/test_transformers.py: class name -> the config attribute holding that softcap (None: no softcap).
FUSED_MODELS = {
    "LlamaForCausalLM": None,
    "MistralForCausalLM": None,
    "Qwen2ForCausalLM": None,
    "Qwen3ForCausalLM": None,
    "Gemma2ForCausalLM": "final_logit_softcapping",
    "Gemma3ForCausalLM": "final_logit_softcapping",
    "Phi3ForCausalLM": None,
    "PhiForCausalLM": None,  # an LM head with a bias
    "GPT2LMHeadModel": None,
}

_COMMON_OPTIONS = {"label_smoothing", "z_loss", "backend"}
_LOSS_OPTIONS = _COMMON_OPTIONS | {"inplace_backward", "fused"}  # fusedce.cross_entropy's
_FUSED_OPTIONS = _COMMON_OPTIONS | {"chunk_size"}  # fusedce.linear_cross_entropy's


def causal_lm_targets(labels: torch.Tensor, shift_labels: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """ForCausalLMLoss's flat targets: token t predicts labels[t + 1] and the last token nothing, unless
    shift_labels gives the targets already."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least, as transformers' loss (which upcasts the logits) is: fusedce accumulates in fp32 and
    returns the unrounded loss when asked, so neither the loss nor the scale its backward hands back
    (1 / num_items_in_batch) is rounded to a bf16 model's dtype."""
    return torch.promote_types(dtype, torch.float32)


def _reduce_like_transformers(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """The mean as it came without num_items_in_batch, else the sum divided by it."""
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class CausalLMLoss:
    """The loss path: transformers' ForCausalLMLoss computed by fusedce.cross_entropy on the logits as they
    come (no fp32 copy of them: fusedce accumulates in fp32 whatever their dtype). `options` are
    fusedce.cross_entropy's keyword arguments."""

    def __init__(self, **options):
        self.options = options

    def __call__(self, logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels=None, **kwargs):  # kwargs: the model's other keyword arguments, unused as in transformers
        target = causal_lm_targets(labels, shift_labels, ignore_index).to(logits.device)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = fusedce.cross_entropy(logits.reshape(-1, vocab_size), target, ignore_index=ignore_index,
                                     reduction=reduction, dtype=_loss_dtype(logits.dtype), **self.options)
        return _reduce_like_transformers(loss, num_items_in_batch)


@dataclasses.dataclass
class _LossRequest:
    """What the LM head needs, in one fused-path call, to compute the loss instead of the logits."""
    labels: torch.Tensor
    shift_labels: Optional[torch.Tensor]
    num_items_in_batch: Any
    ignore_index: int
    softcap: Optional[float]
    options: dict

    def loss(self, hidden_states: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        target = causal_lm_targets(self.labels, self.shift_labels, self.ignore_index).to(hidden_states.device)
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        if hidden.shape[0] != target.shape[0]:
            raise ValueError(f"the LM head was given {hidden.shape[0]} hidden states but the labels give "
                             f"{target.shape[0]} targets: with logits_to_keep, pass labels (or shift_labels) for "
                             f"the kept positions only")
        reduction = "mean" if self.num_items_in_batch is None else "sum"
        loss = fusedce.linear_cross_entropy(hidden, weight, target, bias, ignore_index=self.ignore_index,
                                            reduction=reduction, softcap=self.softcap,
                                            dtype=_loss_dtype(hidden.dtype), **self.options)
        return _reduce_like_transformers(loss, self.num_items_in_batch)


class _HeadState:
    """Held by a patched LM head: the request of the fused-path call in progress, and its answer."""

    def __init__(self):
        self.request: Optional[_LossRequest] = None
        self.loss: Optional[torch.Tensor] = None


def _head_forward(head: torch.nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """The patched LM head's forward: the logits, or, when a request is set, the loss (kept for the model's
    forward) and an empty placeholder, on which the model's softcap, if any, costs nothing."""
    state = head._fusedce_head
    request, state.request = state.request, None  # one loss per request
    if request is None:
        return type(head).forward(head, hidden_states)
    state.loss = request.loss(hidden_states, head.weight, head.bias)
    return hidden_states[..., :0]


@dataclasses.dataclass
class _Patch:
    """What apply_fusedce set on a model: enough to run the fused path and to undo it all."""
    forward: Any  # the bound method set as model.forward (None on the loss path)
    previous_forward: Any  # an instance forward set before ours (e.g. by accelerate), else None
    head: Optional[torch.nn.Linear]  # the patched LM head (None on the loss path)
    labels_position: Optional[int]  # where labels sits among forward's positional parameters
    softcap_attribute: Optional[str]
    options: dict  # for linear_cross_entropy


def _call_unpatched(model, patch: _Patch, args, kwargs):
    if patch.previous_forward is not None:
        return patch.previous_forward(*args, **kwargs)
    return type(model).forward(model, *args, **kwargs)


def _fused_forward(model, *args, **kwargs):
    """model.forward on the fused path: see the module's docstring."""
    patch = model._fusedce
    positional = patch.labels_position is not None and len(args) > patch.labels_position
    labels = args[patch.labels_position] if positional else kwargs.get("labels")
    if labels is None or not (model.training and torch.is_grad_enabled()):
        return _call_unpatched(model, patch, args, kwargs)
    if positional:
        args = args[:patch.labels_position] + (None,) + args[patch.labels_position + 1:]
    else:
        kwargs = {**kwargs, "labels": None}
    return_dict = kwargs.pop("return_dict", None)  # as transformers' can_return_tuple decides it
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    softcap = getattr(model.config, patch.softcap_attribute) if patch.softcap_attribute else None
    state = patch.head._fusedce_head
    state.request = _LossRequest(labels, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"),
                                 kwargs.get("ignore_index", -100), softcap, patch.options)
    try:
        output = _call_unpatched(model, patch, args, {**kwargs, "return_dict": True})
    finally:  # leave no request or loss (and its graph) behind, whatever happened
        loss, state.loss, state.request = state.loss, None, None
    if loss is None:
        raise RuntimeError(f"{type(model).__name__}'s forward did not call its LM head, so the fused path has no "
                           f"loss; use apply_fusedce(model, fused_linear=False)")
    output = type(output)(**{**output, "loss": loss, "logits": None})
    return output if return_dict else output.to_tuple()


def _forward_owner(model) -> type:
    """The class whose forward the model runs: a subclass that only adds methods runs its base's."""
    return next(c for c in type(model).__mro__ if "forward" in vars(c))


def _fused_path_refusal(model) -> Optional[str]:
    """Why the fused path cannot serve this model, or None when it can."""
    owner = _forward_owner(model)
    if owner.__name__ not in FUSED_MODELS or not owner.__module__.startswith("transformers.models."):
        return (f"{owner.__name__}'s forward is not one the fused path knows "
                f"(fusedce.integrations.transformers.FUSED_MODELS)")
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or "forward" in vars(head):
        return f"its LM head is a {type(head).__name__}{' with a replaced forward' if head is not None else ''}, " \
               f"not a plain torch.nn.Linear"
    return None


def _check_options(fused_linear: bool, options: dict) -> None:
    unknown = set(options) - _LOSS_OPTIONS - _FUSED_OPTIONS
    if unknown:
        raise TypeError(f"apply_fusedce got unknown options {sorted(unknown)}; it takes "
                        f"{sorted(_LOSS_OPTIONS | _FUSED_OPTIONS)}")
    if not fused_linear and "chunk_size" in options:
        raise ValueError("chunk_size is an option of the fused path, and fused_linear=False turns it off")


def apply_fusedce(model, *, fused_linear: bool = True, **options):
    """Makes fusedce compute this causal LM's loss, and with fused_linear (the default) fuses its LM head
    with the loss in training calls with labels, whose output's logits are then None. Acts on this
    instance only; remove_fusedce(model) undoes it. Returns the model.

    options: label_smoothing, z_loss, backend (both paths), inplace_backward and fused (the loss path:
    fusedce.cross_entropy's), chunk_size (the fused path: fusedce.linear_cross_entropy's). A model that
    the fused path does not know gets the loss path with a warning naming it."""
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"apply_fusedce takes a transformers PreTrainedModel, got {type(model).__name__} (for a "
                        f"PEFT model pass model.get_base_model())")
    if "_fusedce" in vars(model):
        raise RuntimeError(f"fusedce is already applied to this {type(model).__name__}: call remove_fusedce(model) "
                           f"first to apply it with other options")
    if "_loss_function" in vars(model):
        raise ValueError(f"this {type(model).__name__} has a loss_function of its own, which fusedce would replace")
    if model.loss_function is not ForCausalLMLoss:
        raise ValueError(f"apply_fusedce is for causal language models; {type(model).__name__}'s loss is "
                         f"{model.loss_function.__name__}, not ForCausalLMLoss")
    _check_options(fused_linear, options)
    version = Version(transformers.__version__)
    if not SUPPORTED_VERSIONS[0] <= version < SUPPORTED_VERSIONS[1]:
        warnings.warn(f"fusedce's transformers integration is tested with transformers >= {SUPPORTED_VERSIONS[0]}, "
                      f"< {SUPPORTED_VERSIONS[1]}, not {version}", stacklevel=2)

    refusal = _fused_path_refusal(model) if fused_linear else None
    if refusal is not None:
        warnings.warn(f"fusedce: {type(model).__name__} gets the loss path (fusedce.cross_entropy on its logits), "
                      f"not the fused LM head: {refusal}", stacklevel=2)
    model.loss_function = CausalLMLoss(**{k: v for k, v in options.items() if k in _LOSS_OPTIONS})
    if not fused_linear or refusal is not None:
        model._fusedce = _Patch(None, None, None, None, None, {})
        return model

    cls_forward = type(model).forward
    parameters = [p for p in inspect.signature(cls_forward).parameters.values()
                  if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]  # without self
    names = [p.name for p in parameters]
    head = model.get_output_embeddings()
    head._fusedce_head = _HeadState()
    head.forward = types.MethodType(_head_forward, head)
    # a bound method (deepcopy binds the copy to the copied model) with the forward's signature, which
    # Trainer and generate inspect
    forward = types.MethodType(functools.wraps(cls_forward)(
        lambda self, *args, **kwargs: _fused_forward(self, *args, **kwargs)), model)
    model._fusedce = _Patch(forward, vars(model).get("forward"), head,
                            names.index("labels") if "labels" in names else None,
                            FUSED_MODELS[_forward_owner(model).__name__],
                            {k: v for k, v in options.items() if k in _FUSED_OPTIONS})
    model.forward = forward
    return model


def remove_fusedce(model):
    """Undoes apply_fusedce(model): the model's forward, LM head and loss function are its own again.
    Returns the model."""
    patch = vars(model).get("_fusedce")
    if patch is None:
        raise ValueError(f"fusedce is not applied to this {type(model).__name__}")
    if patch.forward is not None:
        if vars(model).get("forward") is not patch.forward:
            raise RuntimeError("model.forward was replaced after apply_fusedce; undo that replacement first")
        if patch.previous_forward is not None:
            model.forward = patch.previous_forward
        else:
            del model.forward
        del patch.head.forward, patch.head._fusedce_head
    del model._loss_function, model._fusedce
    return model


@contextlib.contextmanager
def fusedce_applied(model, *, fused_linear: bool = True, **options):
    """`with fusedce_applied(model): ...` applies fusedce to the model for the block (see apply_fusedce)."""
    apply_fusedce(model, fused_linear=fused_linear, **options)
    try:
        yield model
    finally:
        remove_fusedce(model)
