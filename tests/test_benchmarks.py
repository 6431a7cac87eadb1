"""The benchmark harness's own behaviour: which cases a command line selects, that a run stopped at a
time limit or by a failing provider still writes what it measured, and that providers cannot disturb
each other's inputs."""
import functools
import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import __main__ as harness
from benchmarks import measure
from benchmarks.cases import SUITES
from benchmarks.providers import Provider


def configs(*argv):
    return harness.select_configs(harness.parse_args(["--device", "cpu", *argv]), SUITES["ce"], "cpu")


def test_shape_with_a_dtype_is_measured_in_that_dtype_only():
    assert configs("--shapes", "8x16:bfloat16,4x32", "--dtypes", "float32,float16") == [
        ((8, 16), torch.bfloat16), ((4, 32), torch.float32), ((4, 32), torch.float16)]


def test_unknown_dtype_is_named():
    with pytest.raises(SystemExit, match="unknown dtype 'fp8'"):
        configs("--shapes", "8x16:fp8")


@pytest.mark.parametrize("stop,code,why", [
    (KeyboardInterrupt(), 130, "interrupted"),  # what SIGINT at a time limit raises
    (harness.ContextLost("CUDA context lost in provider x: boom"), 3, "CUDA context lost in provider x: boom; stopped"),
], ids=["time_limit", "cuda_context_lost"])
def test_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch, stop, code, why):
    real_run_config = harness.run_config
    calls = []

    def second_config_interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise stop
        return real_run_config(*args, **kwargs)

    monkeypatch.setattr(harness, "run_config", second_config_interrupted)
    with pytest.raises(SystemExit) as exit_:
        harness.main(["--device", "cpu", "--providers", "fusedce-torch", "--ops", "fwd", "--no-memory",
                      "--repeats", "1", "--shapes", "4x16,4x32,4x64", "--dtypes", "float32", "--out", str(tmp_path)])
    assert exit_.value.code == code
    result = json.loads((tmp_path / "results-ce.json").read_text())
    assert result["interrupted"] == f"{why} with 1 of 3 measurements done"
    assert [r["shape"] for r in result["records"]] == [[4, 16]]
    assert result["records"][0]["correct"]


def test_exclude_leaves_providers_out():
    args = harness.parse_args(["--device", "cpu", "--exclude", "unfused,torch-compile"])
    _, _, chosen, _ = harness.select(args, SUITES["ce"], "cpu")
    assert "unfused" not in chosen and "torch-compile" not in chosen and "fusedce-cpu" in chosen
    with pytest.raises(SystemExit, match="unknown provider 'nope'"):
        harness.select(harness.parse_args(["--device", "cpu", "--exclude", "nope"]), SUITES["ce"], "cpu")


def test_a_provider_that_overwrites_its_inputs_gets_restored_copies():
    """Liger-Kernel writes the gradient into the logits: neither the shared inputs nor its own next call
    may see that."""
    def overwriting_loss(x, t):
        loss = F.cross_entropy(x, t)
        x.data.fill_(7.0)  # what an in-place gradient does to the caller's tensor
        return loss

    logits, target = torch.randn(4, 10), torch.randint(0, 10, (4,))
    kept = logits.clone()
    expected = F.cross_entropy(logits, target)
    provider = Provider("overwrites", overwriting_loss, overwrites_inputs=True)
    for op in ("fwd", "fwd+bwd"):
        setup, run = provider.make(op, (logits, target))
        for _ in range(2):
            setup()
            out = run()
            torch.testing.assert_close(out if op == "fwd" else out[0], expected)
    assert torch.equal(logits, kept)


def _gpu_branch_on_the_cpu(monkeypatch, usable):
    """run_config's one-case-at-a-time GPU branch, run on CPU tensors with CPU timing."""
    monkeypatch.setattr(measure, "time_gpu", lambda copies, repeats: measure.time_cpu([copies], repeats)[0])
    monkeypatch.setattr(measure, "peak_memory_gpu", lambda case: 0)
    monkeypatch.setattr(measure, "gpu_usable", lambda: usable)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    suite = SUITES["ce"]
    make_inputs = suite.make_inputs
    monkeypatch.setattr(suite, "make_inputs", lambda shape, dtype, device, seed=0: make_inputs(shape, dtype, "cpu", seed))

    def broken(x, t):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    providers = {"broken": Provider("broken", broken), "torch": Provider("torch", F.cross_entropy)}
    records, skipped = [], []
    run = functools.partial(harness.run_config, suite, (4, 16), torch.float32, ["fwd", "fwd+bwd"], providers, "cuda",
                            1, True, harness.Progress(4), records, skipped)
    return run, records, skipped


def test_a_failing_provider_costs_only_its_own_records(monkeypatch):
    run, records, skipped = _gpu_branch_on_the_cpu(monkeypatch, usable=True)
    run()
    assert [(r["provider"], r["op"], r["correct"]) for r in records] == [("torch", "fwd", True), ("torch", "fwd+bwd", True)]
    assert [s["reason"] for s in skipped] == [
        f"RuntimeError at broken {op} 4x16 float32: CUDA error: an illegal memory access was encountered"
        for op in ("fwd", "fwd+bwd")]


def test_a_lost_cuda_context_stops_the_run(monkeypatch):
    run, records, skipped = _gpu_branch_on_the_cpu(monkeypatch, usable=False)
    with pytest.raises(harness.ContextLost, match="CUDA context lost in provider broken: RuntimeError at broken fwd"):
        run()
    assert records == [] and len(skipped) == 1


def test_speed_ups_say_faster_or_slower():
    from benchmarks.report import speedup
    assert (speedup(2.0, 1.0), speedup(1.0, 4.0), speedup(1.0, 1.001)) == ("2.00× faster", "4.00× slower", "1.00×")


def test_a_run_of_one_size_still_plots_every_op(tmp_path):
    """--quick measures one vocabulary size: bars per provider, the fused mode beside the others' fwd+bwd."""
    pytest.importorskip("matplotlib")
    harness.main(["--device", "cpu", "--providers", "fusedce-torch,torch", "--ops", "fwd,fwd+bwd,fused",
                  "--no-memory", "--repeats", "1", "--shapes", "4x16", "--dtypes", "float32", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["ce_fwd_bwd_float32.png", "ce_fwd_float32.png"]


def test_linear_suite_reports_flops_against_a_matmul_of_the_same_run(tmp_path):
    harness.main(["--suite", "linear", "--device", "cpu", "--providers", "materialised", "--no-memory",
                  "--repeats", "1", "--shapes", "8x16x64", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results-linear.json").read_text())
    assert result["metric"] == ["tflops", "TFLOP/s", "matmul"] and result["peaks"]["float32"] > 0
    fwd = next(r for r in result["records"] if r["op"] == "fwd")
    assert fwd["tflops"] == pytest.approx(2 * 8 * 16 * 64 / (fwd["ms"] * 1e-3) / 1e12)


def test_parallel_suite_counts_twelve_bytes_a_row_for_the_plain_loss(tmp_path):
    from benchmarks import parallel
    parallel.main(["--worlds", "2", "--shape", "64x640", "--repeats", "1", "--out", str(tmp_path)])
    with open(tmp_path / "results-parallel.json") as f:
        records = {r["provider"]: r for r in json.load(f)["records"]}
    assert set(records) == {"fusedce-vocab-parallel", "gather+F.cross_entropy", "dtensor-loss_parallel",
                            "fusedce-on-own-shard-alone"}
    # 4 bytes (MAX) + 8 (SUM) a row, and the layout's 3 floats a rank and the target hash's 2 once
    assert records["fusedce-vocab-parallel"]["collective_bytes_per_rank"] == 64 * 12 + (3 * 2 + 2) * 4
    assert records["gather+F.cross_entropy"]["collective_bytes_per_rank"] == 64 * 640 * 4  # the whole logits
