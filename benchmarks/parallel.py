"""python -m benchmarks.parallel [--worlds 2,4] [--shape 4096x32000] [--repeats 5] [--out DIR]: the
vocab-parallel loss over gloo on the CPU, forward + backward of the "mean" loss of [rows, V] fp32 logits
split by class over W processes, per rank: time (median of the slowest rank, a barrier before each
call), peak memory (VmHWM over what existed before the call, as measure.py) and
the bytes each rank hands to collectives, against gathering the logits then F.cross_entropy and
against DTensor's loss_parallel, and beside fusedce.cross_entropy on the rank's shard alone (no
collective, not the same loss: the yardstick of the memory bound). Writes results-parallel.json."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from .measure import peak_memory_cpu_here, time_calls


class CountBytes(contextlib.ContextDecorator):
    """Bytes of the tensors this rank passes to all_reduce / all_gather while active (the payload; gloo's
    ring moves about 2 (W - 1) / W of it per rank for an all_reduce)."""

    def __enter__(self):
        self.bytes, self.saved = 0, {}
        for name in ("all_reduce", "all_gather_into_tensor"):
            original = getattr(dist, name)
            self.saved[name] = original

            def counted(tensor, *args, _original=original, **kwargs):
                self.bytes += tensor.numel() * tensor.element_size()
                return _original(tensor, *args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(dist, name, original)


def providers(shard, target, world):
    """name -> run() (forward + backward), each on a fresh leaf of this rank's shard."""
    import fusedce
    import fusedce.distributed as fd
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import loss_parallel
    mesh = init_device_mesh("cpu", (world,))

    def fusedce_parallel():
        x = shard.detach().requires_grad_()
        fd.vocab_parallel_cross_entropy(x, target).backward()
        return x.grad

    def gather_then_torch():
        x = shard.detach().requires_grad_()
        full = torch.empty(world * shard.shape[0], shard.shape[1])
        dist.all_gather_into_tensor(full, x.detach())  # then the gathered logits, differentiable in this shard
        parts = list(full.view(world, *shard.shape).unbind(0))
        parts[dist.get_rank()] = x
        F.cross_entropy(torch.cat(parts, 1), target).backward()
        return x.grad

    def dtensor_loss_parallel():
        x = shard.detach().requires_grad_()
        d = DTensor.from_local(x, mesh, [Shard(1)], run_check=False)
        with loss_parallel():
            F.cross_entropy(d, target).backward()
        return x.grad

    def fusedce_shard_alone():  # no collective: what the memory bound is relative to
        x = shard.detach().requires_grad_()
        fusedce.cross_entropy(x, target.clamp(max=shard.shape[1] - 1)).backward()
        return x.grad

    return {"fusedce-vocab-parallel": fusedce_parallel, "gather+F.cross_entropy": gather_then_torch,
            "dtensor-loss_parallel": dtensor_loss_parallel, "fusedce-on-own-shard-alone": fusedce_shard_alone}


def _rank(rank, world, port, rows, vocab, repeats, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g)
    target = torch.randint(0, vocab, (rows,), generator=g)
    local = vocab // world
    shard = logits[:, rank * local:(rank + 1) * local].contiguous()
    del logits
    runs = providers(shard, target, world)
    # each provider's calls in a block of their own, after a warm-up call: interleaved call by call, a
    # call after the gathering providers' GBs of frees ran 3-4x slower (fusedce on its own shard at
    # [4096, 16000]: 85-95 ms a call beside the vocab-parallel loss alone, 340 ms beside all three)
    seconds = {}
    for name, run in runs.items():
        run()
        seconds.update(time_calls({name: run}, repeats, before=dist.barrier))
    record = {}
    for name, run in runs.items():
        with CountBytes() as counted:
            dist.barrier()
            run()
        dist.barrier()
        peak = peak_memory_cpu_here((dist.barrier, run))
        record[name] = {"ms": statistics.median(seconds[name]) * 1e3, "peak_mem_bytes": peak,
                        "collective_bytes": counted.bytes}
    gathered = [None] * world
    dist.all_gather_object(gathered, record)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_world(world, rows, vocab, repeats, tmp):
    path = os.path.join(tmp, f"world{world}.json")
    mp.spawn(_rank, args=(world, free_port(), rows, vocab, repeats, path), nprocs=world, join=True)
    with open(path) as f:
        per_rank = json.load(f)
    os.remove(path)
    return [{"provider": name, "world": world, "shape": [rows, vocab], "dtype": "float32",
             "ms": max(r[name]["ms"] for r in per_rank),  # the slowest rank's median
             "peak_mem_bytes_per_rank": max(r[name]["peak_mem_bytes"] for r in per_rank),
             # DTensor's functional collectives pass no dist.* call that CountBytes sees
             **({"collective_bytes_per_rank": max(r[name]["collective_bytes"] for r in per_rank),
                 "collective_bytes_per_row": max(r[name]["collective_bytes"] for r in per_rank) / rows}
                if name != "dtensor-loss_parallel" else {"collective_bytes_per_rank": None,
                                                         "collective_bytes_per_row": None})}
            for name in per_rank[0]]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.parallel", description=__doc__)
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--shape", default="4096x32000")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join("benchmarks", "out"))
    args = p.parse_args(argv)
    rows, vocab = map(int, args.shape.split("x"))
    os.makedirs(args.out, exist_ok=True)
    records = [r for w in map(int, args.worlds.split(",")) for r in measure_world(w, rows, vocab, args.repeats,
                                                                                  args.out)]
    from .__main__ import device_name, git_commit
    result = {"suite": "parallel", "device": device_name("cpu"), "torch": torch.__version__, "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.parallel " + " ".join(argv or []), "records": records}
    path = os.path.join(args.out, "results-parallel.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'provider':<26} {'W':>2} {'ms':>9} {'peak MiB/rank':>14} {'bytes/row/rank':>15}")
    for r in records:
        print(f"{r['provider']:<26} {r['world']:>2} {r['ms']:>9.1f} {r['peak_mem_bytes_per_rank'] / 2**20:>14.1f} "
              f"{float('nan') if r['collective_bytes_per_row'] is None else r['collective_bytes_per_row']:>15.1f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
