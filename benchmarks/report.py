"""Output of a benchmark run: the terminal table, the JSON file and the PNG plots."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List


def table(result: Dict) -> str:
    copy = result["copy_gbps"]
    lines = [f"device: {result['device']}   torch {result['torch']}   triton {result['triton']}   "
             f"copy bandwidth {copy:.1f} GB/s   commit {result['commit'][:10]}",
             f"{'shape':>14} {'dtype':>9} {'op':>8} {'provider':>15} {'ms':>9} {'GB/s':>8} {'%copy':>6} "
             f"{'peak MB':>9} {'vs torch':>8} {'vs unfused':>10}  check"]
    baseline = {(r["shape"][0], r["shape"][1], r["dtype"], r["op"], r["provider"]): r["ms"] for r in result["records"]}
    for r in result["records"]:
        # the fused mode does the user's forward + backward: compare it with the others' fwd+bwd
        key = (r["shape"][0], r["shape"][1], r["dtype"], "fwd+bwd" if r["op"] == "fused" else r["op"])
        vs = [baseline.get(key + (p,)) for p in ("torch", "unfused")]
        ratios = [f"{b / r['ms']:.2f}x" if b else "-" for b in vs]
        peak = f"{r['peak_mem_bytes'] / 2**20:.1f}" if r.get("peak_mem_bytes") is not None else "-"
        lines.append(f"{r['shape'][0]:>6}x{r['shape'][1]:<7} {r['dtype']:>9} {r['op']:>8} {r['provider']:>15} "
                     f"{r['ms']:>9.3f} {r['gbps']:>8.1f} {100 * r['gbps'] / copy:>5.0f}% {peak:>9} "
                     f"{ratios[0]:>8} {ratios[1]:>10}  {'ok' if r['correct'] else 'WRONG: ' + r['problem']}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['provider']}: {s['reason']}")
    return "\n".join(lines)


def write_json(result: Dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def plots(result: Dict, out_dir: str) -> List[str]:
    """Throughput and peak memory against vocabulary size, one line per provider, for each
    (op, dtype, rows). Returns the files written (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    groups: Dict = defaultdict(lambda: defaultdict(list))
    for r in result["records"]:
        groups[(r["op"], r["dtype"], r["shape"][0])][r["provider"]].append(r)
    written = []
    for (op, dtype, rows), by_provider in sorted(groups.items()):
        if max(len(v) for v in by_provider.values()) < 2:
            continue  # one vocabulary size: nothing to plot against
        fig, (ax_bw, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
        for provider, recs in sorted(by_provider.items()):
            recs = sorted(recs, key=lambda r: r["shape"][1])
            vocab = [r["shape"][1] for r in recs]
            ax_bw.plot(vocab, [r["gbps"] for r in recs], marker="o", label=provider)
            ax_mem.plot(vocab, [(r["peak_mem_bytes"] or 0) / 2**30 for r in recs], marker="o", label=provider)
        ax_bw.axhline(result["copy_gbps"], color="gray", linestyle="--", label="copy bandwidth")
        ax_bw.set(xlabel="vocabulary size", ylabel="effective GB/s (minimal bytes / time)", xscale="log",
                  title=f"{op}, {rows} rows, {dtype}")
        ax_mem.set(xlabel="vocabulary size", ylabel="peak extra memory (GiB)", xscale="log",
                   title=f"peak memory, {op}, {rows} rows, {dtype}")
        ax_bw.legend(fontsize=8)
        fig.suptitle(result["device"])
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op.replace('+', '_')}_{dtype}_{rows}rows.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
