"""Output of a benchmark run: the terminal table, the JSON file and the PNG plots.
`python -m benchmarks.report RESULTS.json` prints a run as the Markdown table the README shows;
`python -m benchmarks.report --plots RESULTS.json` (re)draws its plots beside it."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List


def compared_op(op: str) -> str:
    """The fused mode does the user's forward + backward: it is compared with the others' fwd+bwd."""
    return "fwd+bwd" if op == "fused" else op


def speedup(base_ms: float, ms: float) -> str:
    ratio = base_ms / ms
    if round(ratio, 2) == 1:
        return "1.00×"
    return f"{ratio:.2f}× faster" if ratio > 1 else f"{1 / ratio:.2f}× slower"


def _ratios(result: Dict, r: Dict) -> List[str]:
    by_key = {(tuple(x["shape"]), x["dtype"], x["op"], x["provider"]): x for x in result["records"]}
    key = (tuple(r["shape"]), r["dtype"], compared_op(r["op"]))
    return [speedup(by_key[key + (b,)]["ms"], r["ms"]) if key + (b,) in by_key else "-"
            for b in result["baselines"]]


def _peak_mib(r: Dict, digits: int) -> str:
    return f"{r['peak_mem_bytes'] / 2**20:.{digits}f}" if r.get("peak_mem_bytes") is not None else "-"


def table(result: Dict) -> str:
    key, unit, yardstick = result["metric"]
    baselines = result["baselines"]
    peaks = ", ".join(f"{d} {v:.2f} {unit}" for d, v in result["peaks"].items())
    lines = [f"device: {result['device']}   torch {result['torch']}   triton {result['triton']}   "
             f"{yardstick} {peaks}   commit {result['commit'][:10]}",
             f"{'shape':>18} {'dtype':>9} {'op':>8} {'provider':>15} {'loss':>9} {'ms':>9} {unit:>8} "
             f"{'%' + yardstick:>7} {'peak MiB':>9} " + " ".join(f"{'vs ' + b:>18}" for b in baselines) + "  check"]
    for r in result["records"]:
        shape = "x".join(str(v) for v in r["shape"])
        loss = f"{r['loss']:.5f}" if r.get("loss") is not None else "-"
        lines.append(f"{shape:>18} {r['dtype']:>9} {r['op']:>8} {r['provider']:>15} {loss:>9} {r['ms']:>9.3f} "
                     f"{r[key]:>8.2f} {100 * r[key] / result['peaks'][r['dtype']]:>6.0f}% {_peak_mib(r, 1):>9} "
                     + " ".join(f"{x:>18}" for x in _ratios(result, r))
                     + f"  {'ok' if r['correct'] else 'WRONG: ' + r['problem']}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['provider']}: {s['reason']}")
    return "\n".join(lines)


def write_json(result: Dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def plots(result: Dict, out_dir: str) -> List[str]:
    """One PNG per (op, dtype): throughput and peak memory of every provider, fusedce's fused mode
    beside the others' fwd+bwd (counted with fwd+bwd's bytes). Against vocabulary size where the run
    has several, else as bars.
    Returns the files written (none without matplotlib, which it says)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    key, unit, yardstick = result["metric"]
    groups: Dict = defaultdict(lambda: defaultdict(list))
    for r in result["records"]:  # throughput is comparable across row counts: one plot per op and dtype
        label = r["provider"] + (" (fused)" if r["op"] == "fused" else "")
        groups[(compared_op(r["op"]), r["dtype"])][label].append(dict(r, value=_as_compared_op(result, r, key)))
    speed_label = f"{unit} ({'the minimal bytes' if key == 'gbps' else 'matmul FLOPs'} of {{op}} / time)"
    written = []
    for (op, dtype), by_label in sorted(groups.items()):
        fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
        legend_below = len({r["shape"][-1] for recs in by_label.values() for r in recs}) > 1
        if legend_below:
            _against_vocabulary(ax_speed, ax_mem, by_label, key)
            ax_speed.axhline(result["peaks"][dtype], color="gray", linestyle="--", label=yardstick)
            ax_speed.set_ylabel(speed_label.format(op=op))
            fig.legend(*ax_speed.get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8)
            title = f"{result['suite']} {op}, {dtype}"
        else:  # one size (--quick): a bar per provider
            shape = _bars(ax_speed, ax_mem, by_label, key)
            ax_speed.axvline(result["peaks"][dtype], color="gray", linestyle="--")
            ax_speed.set_xlabel(f"{speed_label.format(op=op)}; dashed: {yardstick}")
            title = f"{result['suite']} {op} {shape}, {dtype}"
        ax_speed.set_title(f"{title}: throughput (higher is better)")
        ax_mem.set_title("peak extra memory, GiB (lower is better)")
        fig.suptitle(f"{result['device']}, commit {result['commit'][:10]}")
        fig.tight_layout(rect=(0, 0.08 if legend_below else 0, 1, 1))
        path = os.path.join(out_dir, f"{result['suite']}_{op.replace('+', '_')}_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _against_vocabulary(ax_speed, ax_mem, by_label, key) -> None:
    for label, recs in sorted(by_label.items()):
        recs = sorted(recs, key=lambda r: r["shape"][-1])
        vocab = [r["shape"][-1] for r in recs]
        ax_speed.plot(vocab, [r["value"] for r in recs], marker="o", label=label)
        ax_mem.plot(vocab, [(r["peak_mem_bytes"] or 0) / 2**30 for r in recs], marker="o", label=label)
    for ax in (ax_speed, ax_mem):
        ax.set(xlabel="vocabulary size", xscale="log")


def _as_compared_op(result: Dict, r: Dict, key: str) -> float:
    """r's throughput counted with the work of the op it is compared with (the fused mode's time for
    fwd+bwd's bytes), so that one plot orders its providers as their times do."""
    if compared_op(r["op"]) == r["op"]:
        return r[key]
    ref = next(x for x in result["records"] if x["op"] == compared_op(r["op"]) and x["shape"] == r["shape"]
               and x["dtype"] == r["dtype"])
    return ref[key] * ref["ms"] / r["ms"]


def _bars(ax_speed, ax_mem, by_label, key) -> str:
    """Fastest first, each bar with its time; returns the shape."""
    items = sorted(((label, recs[0]) for label, recs in by_label.items()), key=lambda item: -item[1]["value"])
    labels = [label for label, _ in items]
    ax_speed.barh(labels, [r["value"] for _, r in items], color="tab:blue")
    ax_mem.barh(labels, [(r["peak_mem_bytes"] or 0) / 2**30 for _, r in items], color="tab:gray")
    for i, (_, r) in enumerate(items):
        ax_speed.annotate(f" {r['ms']:.1f} ms", (r["value"], i), va="center", fontsize=8)
    for ax in (ax_speed, ax_mem):
        ax.invert_yaxis()
    return "x".join(map(str, items[0][1]["shape"]))


def markdown(result: Dict) -> str:
    """The README's table of a run: time, throughput and peak memory, with speed-ups over the baselines."""
    key, unit, yardstick = result["metric"]
    baselines = result["baselines"]
    peaks = ", ".join(f"{d} {v:.2f} {unit}" for d, v in result["peaks"].items())
    head = (f"| shape | dtype | op | provider | ms | {unit} (% of {yardstick}) | peak MiB | "
            + " | ".join(f"vs {b}" for b in baselines) + " |")
    lines = [f"{result['device']}, torch {result['torch']}, {yardstick} {peaks}, {result['date']}, "
             f"commit {result['commit'][:10]}: `{result['command']}`", "", head, "|" + "---|" * (7 + len(baselines))]
    for r in result["records"]:
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['op']} | {r['provider']} | {r['ms']:.1f} | "
                     f"{r[key]:.2f} ({100 * r[key] / result['peaks'][r['dtype']]:.0f}%) | {_peak_mib(r, 0)} | "
                     + " | ".join(_ratios(result, r)) + " |" + ("" if r["correct"] else " WRONG"))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    draw = sys.argv[1:2] == ["--plots"]
    for path in sys.argv[1 + draw:]:
        with open(path) as f:
            result = json.load(f)
        if draw:
            for png in plots(result, os.path.dirname(path)):
                print(f"wrote {png}")
        else:
            print(markdown(result), end="\n\n")
