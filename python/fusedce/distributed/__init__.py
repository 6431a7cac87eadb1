"""Vocabulary-parallel (tensor-parallel) losses over torch.distributed: each rank holds a slice of the
classes (of the logits, or of the LM head's weight); the loss is that of the gathered logits, computed
from per-row softmax statistics exchanged in two all_reduce calls, the logits never gathered."""
from .linear import vocab_parallel_linear_cross_entropy
from .loss import vocab_parallel_cross_entropy

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
