"""python -m benchmarks.hf_step [--tokens N] [--vocab V] [--hidden H] [--layers L] [--dtype D] [--repeats R]
[--out DIR]: one training step (forward + backward) of a small Llama-shaped transformers model on the CPU,
built from a config (no download), unpatched vs fusedce's loss path vs its fused LM head
(fusedce.integrations.transformers): median time (the variants interleaved), peak memory (a fresh process
per variant, measure.peak_memory_cpu_here) and the loss and gradients checked against the unpatched
model. Writes results-hf-step.json to DIR and prints a markdown table."""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys

import torch

from . import measure
from .__main__ import device_name, git_commit

VARIANTS = {"unpatched": None, "loss path": False, "fused path": True}  # -> apply_fusedce's fused_linear


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.hf_step", description=__doc__)
    p.add_argument("--tokens", type=int, default=4096, help="sequence length of the one-sequence batch")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join("benchmarks", "out"))
    p.add_argument("--probe", choices=list(VARIANTS), help=argparse.SUPPRESS)  # internal: one memory probe
    return p.parse_args(argv)


def build(args, variant: str):
    """The model (seeded, so every variant starts from the same weights) and one batch of labels."""
    import transformers
    from fusedce.integrations.transformers import apply_fusedce

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=args.tokens, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, args.dtype)).train()
    if VARIANTS[variant] is not None:
        apply_fusedce(model, fused_linear=VARIANTS[variant])
    input_ids = torch.randint(0, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": input_ids, "labels": input_ids}


def training_step(model, batch):
    """(setup, run): run is the step, from no gradients (set_to_none) to all of them."""
    def setup():
        model.zero_grad(set_to_none=True)

    def run():
        loss = model(**batch).loss
        loss.backward()
        return loss.detach()

    return setup, run


# glibc keeps freed blocks up to its dynamic mmap threshold (which grows to 32 MiB) in the heap, so the
# warm-up step's chunks would be resident already and the fused path's step would seem to take nothing:
# a fixed 64 KiB threshold maps every tensor of note on its own and unmaps it when freed.
_PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 10)}


def peak_memory(args, variant: str) -> int:
    """The step's peak resident memory over what existed before it, in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.hf_step", "--probe", variant, "--tokens", str(args.tokens),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--layers", str(args.layers), "--dtype", args.dtype]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), **_PROBE_ENV))
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe of {variant} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mem_bytes"]


def probe(args) -> None:
    setup, run = training_step(*build(args, args.probe))
    setup()
    run()  # warm-up: lazy initialisation is not the step's memory
    print(json.dumps({"peak_mem_bytes": measure.peak_memory_cpu_here((setup, run))}))


def errors_against_unpatched(models, batch):
    """Per variant: the loss's relative error, and the largest over parameters of the gradient's largest
    deviation relative to the unpatched gradient's largest element."""
    results = {}
    for variant, model in models.items():
        setup, run = training_step(model, batch)
        setup()
        results[variant] = run(), [p.grad for p in model.parameters()]
    want_loss, want_grads = results["unpatched"]
    return {variant: ((loss.double() - want_loss.double()).abs().item() / want_loss.double().abs().item(),
                      max(((g.double() - w.double()).abs().max() / w.double().abs().max()).item()
                          for g, w in zip(grads, want_grads)))
            for variant, (loss, grads) in results.items()}


def table(result) -> str:
    base = next(r for r in result["records"] if r["variant"] == "unpatched")
    lines = ["| variant | ms | vs unpatched | peak MiB | vs unpatched | loss rel. error | grad rel. error |",
             "|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        lines.append(f"| {r['variant']} | {r['ms']:.0f} | {r['ms'] / base['ms']:.2f}x | "
                     f"{r['peak_mem_bytes'] / 2 ** 20:.0f} | {r['peak_mem_bytes'] / base['peak_mem_bytes']:.2f}x | "
                     f"{r['loss_rel_error']:.1e} | {r['grad_rel_error']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.probe:
        return probe(args)
    import transformers

    load_before = os.getloadavg()  # other processes on the machine skew the times: recorded beside them
    built = {variant: build(args, variant) for variant in VARIANTS}
    batch = built["unpatched"][1]
    models = {variant: model for variant, (model, _) in built.items()}
    times = measure.time_cpu([[training_step(model, batch)] for model in models.values()], args.repeats)
    errors = errors_against_unpatched(models, batch)
    models.clear()
    built.clear()
    records = [{"variant": variant, "ms": ms, "peak_mem_bytes": peak_memory(args, variant),
                "loss_rel_error": errors[variant][0], "grad_rel_error": errors[variant][1]}
               for variant, ms in zip(VARIANTS, times)]
    result = {"benchmark": "hf-step", "device": device_name("cpu"), "torch": torch.__version__,
              "transformers": transformers.__version__, "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.hf_step " + " ".join(sys.argv[1:] if argv is None else argv),
              "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
              "model": {"class": "LlamaForCausalLM", "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
                        "layers": args.layers, "dtype": args.dtype},
              "records": records}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results-hf-step.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
