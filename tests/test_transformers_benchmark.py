"""python -m benchmarks.hf_step at a tiny size: it measures every variant and checks them against the
unpatched model."""
import json

import pytest

pytest.importorskip("transformers")

from benchmarks import hf_step  # noqa: E402


def test_hf_step_benchmark_runs(tmp_path, capsys):
    hf_step.main(["--tokens", "64", "--vocab", "500", "--hidden", "32", "--layers", "1", "--repeats", "1",
                  "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results-hf-step.json").read_text())
    assert [r["variant"] for r in result["records"]] == list(hf_step.VARIANTS)
    for r in result["records"]:
        assert r["ms"] > 0 and r["peak_mem_bytes"] > 0
        assert r["loss_rel_error"] <= 1e-5 and r["grad_rel_error"] <= 1e-5, r
    assert "| fused path |" in capsys.readouterr().out
