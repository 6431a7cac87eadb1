"""Output of a benchmark run: the terminal table, the JSON file and the PNG plots.
`python -m benchmarks.report RESULTS.json` prints a run as the Markdown table the README shows."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List


def table(result: Dict) -> str:
    copy = result["copy_gbps"]
    baselines = result["baselines"]
    lines = [f"device: {result['device']}   torch {result['torch']}   triton {result['triton']}   "
             f"copy bandwidth {copy:.1f} GB/s   commit {result['commit'][:10]}",
             f"{'shape':>18} {'dtype':>9} {'op':>8} {'provider':>15} {'loss':>9} {'ms':>9} {'GB/s':>8} {'%copy':>6} "
             f"{'peak MiB':>9} " + " ".join(f"{'vs ' + b:>15}" for b in baselines)
             + f" {'mem vs ' + baselines[0]:>18}  check"]
    by_key = {(tuple(r["shape"]), r["dtype"], r["op"], r["provider"]): r for r in result["records"]}
    for r in result["records"]:
        # the fused mode does the user's forward + backward: compare it with the others' fwd+bwd
        key = (tuple(r["shape"]), r["dtype"], "fwd+bwd" if r["op"] == "fused" else r["op"])
        ratios = []
        for b in baselines:
            base = by_key.get(key + (b,))
            ratios.append(f"{base['ms'] / r['ms']:.2f}x faster" if base else "-")
        base = by_key.get(key + (baselines[0],))
        mem = (f"{r['peak_mem_bytes'] / base['peak_mem_bytes']:.2f}x" if base and r.get("peak_mem_bytes") is not None
               and base.get("peak_mem_bytes") else "-")
        peak = f"{r['peak_mem_bytes'] / 2**20:.1f}" if r.get("peak_mem_bytes") is not None else "-"
        shape = "x".join(str(v) for v in r["shape"])
        loss = f"{r['loss']:.5f}" if r.get("loss") is not None else "-"
        lines.append(f"{shape:>18} {r['dtype']:>9} {r['op']:>8} {r['provider']:>15} {loss:>9} {r['ms']:>9.3f} {r['gbps']:>8.1f} "
                     f"{100 * r['gbps'] / copy:>5.0f}% {peak:>9} " + " ".join(f"{x:>15}" for x in ratios)
                     + f" {mem:>18}  {'ok' if r['correct'] else 'WRONG: ' + r['problem']}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['provider']}: {s['reason']}")
    return "\n".join(lines)


def write_json(result: Dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def plots(result: Dict, out_dir: str) -> List[str]:
    """Throughput and peak memory against vocabulary size, one line per provider, for each (op, dtype).
    Returns the files written (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    groups: Dict = defaultdict(lambda: defaultdict(list))
    for r in result["records"]:  # effective GB/s is comparable across row counts: one plot per op and dtype
        groups[(r["op"], r["dtype"])][r["provider"]].append(r)
    written = []
    for (op, dtype), by_provider in sorted(groups.items()):
        if max(len({r["shape"][-1] for r in v}) for v in by_provider.values()) < 2:
            continue  # one vocabulary size: nothing to plot against
        fig, (ax_bw, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
        for provider, recs in sorted(by_provider.items()):
            recs = sorted(recs, key=lambda r: r["shape"][-1])
            vocab = [r["shape"][-1] for r in recs]
            ax_bw.plot(vocab, [r["gbps"] for r in recs], marker="o", label=provider)
            ax_mem.plot(vocab, [(r["peak_mem_bytes"] or 0) / 2**30 for r in recs], marker="o", label=provider)
        ax_bw.axhline(result["copy_gbps"], color="gray", linestyle="--", label="copy bandwidth")
        ax_bw.set(xlabel="vocabulary size", ylabel="effective GB/s (minimal bytes / time)", xscale="log",
                  title=f"{result['suite']} {op}, {dtype}")
        ax_mem.set(xlabel="vocabulary size", ylabel="peak extra memory (GiB)", xscale="log",
                   title=f"peak memory, {op}, {dtype}")
        ax_bw.legend(fontsize=8)
        fig.suptitle(result["device"])
        fig.tight_layout()
        path = os.path.join(out_dir, f"{result['suite']}_{op.replace('+', '_')}_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def markdown(result: Dict) -> str:
    """The README's table of a run: time, bandwidth and peak memory, with speed-ups over the baselines."""
    baselines = result["baselines"]
    by_key = {(tuple(r["shape"]), r["dtype"], r["op"], r["provider"]): r for r in result["records"]}
    head = ("| shape | dtype | op | provider | ms | GB/s (% of copy) | peak MiB | "
            + " | ".join(f"vs {b}" for b in baselines) + " |")
    lines = [f"{result['device']}, torch {result['torch']}, copy bandwidth {result['copy_gbps']:.1f} GB/s, "
             f"{result['date']}, commit {result['commit'][:10]}: `{result['command']}`", "", head,
             "|" + "---|" * (7 + len(baselines))]
    for r in result["records"]:
        key = (tuple(r["shape"]), r["dtype"], "fwd+bwd" if r["op"] == "fused" else r["op"])
        ratios = [f"{by_key[key + (b,)]['ms'] / r['ms']:.2f}x" if key + (b,) in by_key else "-" for b in baselines]
        peak = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") is not None else "-"
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['op']} | {r['provider']} | {r['ms']:.1f} | "
                     f"{r['gbps']:.1f} ({100 * r['gbps'] / result['copy_gbps']:.0f}%) | {peak} | " + " | ".join(ratios)
                     + " |" + ("" if r["correct"] else " WRONG"))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    for path in sys.argv[1:]:
        with open(path) as f:
            print(markdown(json.load(f)), end="\n\n")
