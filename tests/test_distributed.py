"""fusedce.distributed over gloo on the CPU: each world size (2, 3, 4) is spawned once and runs the
whole grid of tests/distributed_cases.py; each case here reads its outcome on every rank."""
import faulthandler
import json
import os
import socket
import sys
import warnings

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_cases as cases

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
WORLDS = (2, 3, 4)
LOSS_CASES = [case_id for case_id, _ in cases.loss_cases(cases.backends_to_run())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, case_ids):
    faulthandler.enable()  # a rank killed by a signal shows its Python stack
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    cases.run(rank, world, port, out_dir, case_ids)


def spawn(world, tmp_path_factory, target=_worker, *args):
    for attempt in (1, 2):
        out = str(tmp_path_factory.mktemp(f"world{world}"))
        try:
            mp.spawn(target, args=(world, free_port(), out, *args), nprocs=world, join=True)
            break
        except mp.ProcessExitedException as e:
            # A failed case does not end its rank (its outcome is in the JSON); a signal does. Seen twice in
            # about 20 local runs: SIGABRT ("terminate called without an active exception") on every rank
            # during the first cases, not reproduced since; the cause is not known yet. One respawn, said
            # aloud, so that it shows in CI's summary rather than passing silently.
            if e.signal_name is None or attempt == 2:
                raise
            warnings.warn(f"world {world}: {e}; spawned again")
    results = []
    for rank in range(world):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    return request.param, spawn(request.param, tmp_path_factory, _worker, LOSS_CASES)


@pytest.mark.parametrize("case_id", LOSS_CASES)
def test_loss_and_gradient_match_the_gathered_logits(world, case_id):
    size, results = world
    failures = [f"rank {r}:\n{res[case_id]}" for r, res in enumerate(results) if res[case_id] != "ok"]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case_id", [case_id for case_id, _ in cases.linear_cases()] + cases.DTENSOR_CASES)
def test_linear_and_dtensor_match_their_references(world, case_id):
    size, results = world
    failures = [f"rank {r}:\n{res[case_id]}" for r, res in enumerate(results) if res[case_id] != "ok"]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name,kind,words", [
    ("weight_size_on_one_rank", "InvalidArgument", "rank"),
    ("overlapping_vocab_start", "InvalidArgument", "vocab_start"),
    ("vocab_start_on_some_ranks", "InvalidArgument", "every rank or on none"),
    ("target_out_of_range", "IndexError", "out of bounds"),
    ("targets_differ", "InvalidArgument", "differ across ranks"),
    ("probs_shape_on_one_rank", "InvalidArgument", "rank"),
])
def test_bad_input_raises_on_every_rank(world, name, kind, words):
    size, results = world
    raised = [res["error-" + name] for res in results]
    assert all(k == kind and words in message for k, message in raised), raised


def test_gpu_mode_reads_the_layout_once_and_poisons_a_changed_one(world):
    size, results = world
    for res in results:
        first, cached, differ, reference = res["sync_free"]
        assert first == cached and abs(first - reference) <= 5e-6 * abs(reference), res["sync_free"]
        assert differ != differ, "targets that differ across ranks must give NaN in the device-checked mode"
