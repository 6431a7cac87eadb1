"""The patched models in the settings they train in: transformers.Trainer with gradient accumulation,
torch.compile of the training step (no graph break at all, so none from fusedce), torch.autocast."""
import copy
import tempfile

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fusedce  # noqa: E402
from fusedce.integrations.transformers import apply_fusedce  # noqa: E402
from test_transformers import (PATHS, assert_rel, assert_same_grads, build, make_batch,  # noqa: E402
                               relative_error, targets_in)


def train_with_trainer(model, output_dir):
    rows = []
    for seed in range(6):
        batch = make_batch(seed=seed)
        rows += [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
    # SGD at a constant rate: Adam's normalisation would turn rounding-level gradient differences on
    # near-zero elements into full-size steps
    args = transformers.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        optim="sgd", learning_rate=0.01, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reached the model
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_trainer_matches_unpatched(name, monkeypatch):
    reference = build(name)
    initial = copy.deepcopy(reference)
    patched = apply_fusedce(copy.deepcopy(reference))
    calls = []
    fused = fusedce.linear_cross_entropy
    monkeypatch.setattr(fusedce, "linear_cross_entropy", lambda *a, **k: calls.append(k) or fused(*a, **k))
    with tempfile.TemporaryDirectory() as out:
        want = train_with_trainer(reference, out)
        got = train_with_trainer(patched, out)
    assert len(calls) == 3 * 2 and all(k["reduction"] == "sum" for k in calls)  # 3 steps x 2 micro-batches
    assert len(got) == len(want) == 3
    for step, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= 1e-5 * abs(w), f"step {step}: logged loss {g}, unpatched {w}"
    for (param_name, p), q, p0 in zip(patched.named_parameters(), reference.parameters(), initial.parameters()):
        assert not torch.equal(q, p0), f"{param_name} did not train"
        assert_rel(p.detach(), q.detach(), f"{param_name} after training")


def compiled_step_matches_eager(name, path, backend, num_items):
    reference = build(name)
    patched = apply_fusedce(copy.deepcopy(reference), fused_linear=path == "fused")
    batch = make_batch()
    kwargs = {"num_items_in_batch": targets_in(batch)} if num_items else {}
    torch._dynamo.reset()
    compiled = torch.compile(patched, backend=backend, fullgraph=True)  # a graph break raises
    output = compiled(**batch, **kwargs)
    assert (output.logits is None) == (path == "fused")
    output.loss.backward()
    want = reference(**batch, **kwargs).loss
    want.backward()
    assert_rel(output.loss.detach(), want.detach(), "loss")
    assert_same_grads(patched, reference)


@pytest.mark.parametrize("name, path, num_items", [
    ("llama", "fused", False), ("llama", "fused", True), ("llama", "loss", False), ("llama", "loss", True),
    ("gemma2", "fused", True),  # the softcap
    ("phi", "fused", False),  # the head's bias
])
def test_compiled_training_step(name, path, num_items):
    """aot_eager: dynamo and AOTAutograd trace what inductor would compile, in seconds."""
    compiled_step_matches_eager(name, path, "aot_eager", num_items)


def test_compiled_training_step_with_inductor():
    compiled_step_matches_eager("llama", "fused", "inductor", True)  # about a minute on 2 cores


@pytest.mark.parametrize("path", ["fused", "loss"])
def test_under_autocast(path):
    reference = build("llama")
    patched = apply_fusedce(copy.deepcopy(reference), fused_linear=path == "fused")
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = patched(**batch).loss, reference(**batch).loss
    got.backward()
    want.backward()
    # both compute the logits in bf16 from the same bf16 casts; the loss differs by its rounding to bf16
    assert abs(got.double() - want.double()).item() <= 2 ** -7 * want.item()
    for (param_name, p), q in zip(patched.named_parameters(), reference.parameters()):
        err = relative_error(p.grad, q.grad.double())
        assert err <= 2 ** -6, f"grad of {param_name}: {err:.3g}"
