"""The benchmark harness's own behaviour: which cases a command line selects, and that a run stopped at a
time limit still writes what it measured."""
import json

import pytest
import torch

from benchmarks import __main__ as harness
from benchmarks.cases import SUITES


def configs(*argv):
    return harness.select_configs(harness.parse_args(["--device", "cpu", *argv]), SUITES["ce"], "cpu")


def test_shape_with_a_dtype_is_measured_in_that_dtype_only():
    assert configs("--shapes", "8x16:bfloat16,4x32", "--dtypes", "float32,float16") == [
        ((8, 16), torch.bfloat16), ((4, 32), torch.float32), ((4, 32), torch.float16)]


def test_unknown_dtype_is_named():
    with pytest.raises(SystemExit, match="unknown dtype 'fp8'"):
        configs("--shapes", "8x16:fp8")


def test_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch):
    real_run_config = harness.run_config
    calls = []

    def second_config_interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt  # what SIGINT at a time limit raises
        return real_run_config(*args, **kwargs)

    monkeypatch.setattr(harness, "run_config", second_config_interrupted)
    with pytest.raises(SystemExit) as stop:
        harness.main(["--device", "cpu", "--providers", "fusedce-torch", "--ops", "fwd", "--no-memory",
                      "--repeats", "1", "--shapes", "4x16,4x32,4x64", "--dtypes", "float32", "--out", str(tmp_path)])
    assert stop.value.code == 130
    result = json.loads((tmp_path / "results-ce.json").read_text())
    assert result["interrupted"] == "interrupted with 1 of 3 measurements done"
    assert [r["shape"] for r in result["records"]] == [[4, 16]]
    assert result["records"][0]["correct"]
