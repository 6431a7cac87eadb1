"""The NCCL code path of fusedce.distributed with a world of one on a GPU: the loss, lse and gradient
equal fusedce.cross_entropy's, and a class index out of range gives a NaN row (no host sync), as on
one device. Skips without a GPU."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_distributed import free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(),
                                reason="needs a CUDA GPU and NCCL")


def _world_of_one(rank, port, out):
    import fusedce
    import fusedce.distributed as fd
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        logits = torch.randn(64, 1000, device="cuda", requires_grad=True)
        target = torch.randint(0, 1000, (64,), device="cuda")
        target[5] = -100
        results = {}
        for kw in ({}, dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0)):
            loss, lse = fd.vocab_parallel_cross_entropy(logits, target, reduction="none", return_lse=True, **kw)
            ref, ref_lse = fusedce.cross_entropy(logits, target, reduction="none", return_lse=True, **kw)
            grad = torch.autograd.grad(loss.sum(), logits)[0]
            ref_grad = torch.autograd.grad(ref.sum(), logits)[0]
            results[str(kw)] = [float((a - b).abs().max()) for a, b in ((loss, ref), (lse, ref_lse), (grad, ref_grad))]
        bad = target.clone()
        bad[3] = 1000
        nan_rows = fd.vocab_parallel_cross_entropy(logits.detach(), bad, reduction="none").isnan()
        results["bad"] = nan_rows.nonzero()[:, 0].tolist()
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_world_of_one_matches_cross_entropy(tmp_path):
    out = str(tmp_path / "results.pt")
    mp.spawn(_world_of_one, args=(free_port(), out), nprocs=1, join=True)
    results = torch.load(out)
    assert results.pop("bad") == [3]
    for kw, errors in results.items():
        assert max(errors) < 1e-5, (kw, errors)  # fp32 on both paths; reductions in different orders
