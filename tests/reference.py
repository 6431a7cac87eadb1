"""Float64 references for the tests: torch's own cross_entropy on the same (already rounded) inputs
upcast to float64, extended with the z-loss and softcap terms that torch does not have."""
import torch
import torch.nn.functional as F


def reference_loss(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                   z_loss=0.0, softcap=None):
    """Returns the loss in float64 for float64 copies of the inputs (differentiable w.r.t. them)."""
    if not z_loss:  # torch's own reduction, denominators included
        x = softcap * torch.tanh(input / softcap) if softcap else input
        return F.cross_entropy(x, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    x = softcap * torch.tanh(input / softcap) if softcap else input
    per_row = F.cross_entropy(x, target, weight=weight, ignore_index=ignore_index, reduction="none",
                              label_smoothing=label_smoothing)
    soft = target.is_floating_point()
    if z_loss:
        lse = torch.logsumexp(x, dim=1 if x.dim() > 1 else 0)
        valid = torch.ones_like(lse, dtype=torch.bool) if soft else target != ignore_index
        per_row = per_row + torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if soft:
        return per_row.sum() / max(per_row.numel(), 1) if per_row.numel() else per_row.sum() / 0
    valid = target != ignore_index
    denom = weight[target.clamp(0)].masked_fill(~valid, 0).sum() if weight is not None else valid.sum()
    return per_row.sum() / denom


def to64(t):
    return None if t is None else (t.detach().double() if t.is_floating_point() else t)


# Tolerances by dtype of the result: fp32 kernels accumulate in fp32 (a few ulp over V terms);
# fp16/bf16 results are rounded once to the output dtype at the end (2^-11 / 2^-8 relative).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=5e-6, atol=5e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def assert_close(actual, expected, dtype, scale=1.0):
    """Compares to a float64 reference; `scale` is the magnitude the absolute tolerance is relative to
    (e.g. the largest gradient element), since rounding errors are relative to it."""
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * scale,
                               equal_nan=True)
