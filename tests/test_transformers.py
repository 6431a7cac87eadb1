"""fusedce.integrations.transformers against the unpatched model, for every model the fused path knows:
loss and every parameter's gradient over three optimizer steps (fp32, 1e-5 relative to the largest
element of each tensor; bf16 against a float64 copy of the same weights), with and without gradient
accumulation (num_items_in_batch), with padding; outputs, removal and bad input. Tiny random models
built from configs: nothing is downloaded."""
import copy
import inspect
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusedce.integrations.transformers import (FUSED_MODELS, apply_fusedce, fusedce_applied,  # noqa: E402
                                               remove_fusedce)
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

VOCAB = 1003  # unaligned on purpose
# initializer_range 0.3 rather than transformers' 0.02: logits of std ~1.5, so the loss is far from log(V)
# and the softmax far from uniform (a wrong target or a missing softcap shows in every gradient)
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, initializer_range=0.3, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=0, eos_token_id=0)
MODELS = {  # name -> (config class, model class, config overrides)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    # a softcap of 2 with logits of std ~1.2: the cap shapes every logit
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=2.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(final_logit_softcapping=2.0)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),  # its LM head has a bias
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                                   embd_pdrop=0.0, attn_pdrop=0.0)),  # no dropout: deterministic
}
TOL = 1e-5  # fp32: the bound, relative to each tensor's largest element


def build(name, dtype=torch.float32, **overrides):
    config_class, model_class, extra = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, model_class)(config)
    head = model.get_output_embeddings()
    if head.bias is not None:
        torch.nn.init.normal_(head.bias)  # transformers zeroes it: a dropped bias would not show
    return model.to(dtype)


def make_batch(rows=2, length=12, seed=0, pad=4):
    """Random tokens; every second row right-padded by `pad` positions (attention 0, labels -100)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (rows, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, length - pad:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def targets_in(batch):
    """The number of tokens with a target, as Trainer counts num_items_in_batch (labels shifted by one)."""
    return (batch["labels"][:, 1:] != -100).sum()


def assert_rel(got, want, what, tol=TOL):
    assert got is not None and want is not None, f"{what}: missing"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert scale > 0, f"{what}: the reference is all zeros, so the comparison proves nothing"
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def assert_same_grads(patched, reference):
    for (param_name, p), q in zip(patched.named_parameters(), reference.parameters()):
        assert_rel(p.grad, q.grad, f"grad of {param_name}")


def train(model, steps, accumulate):
    """Three SGD steps; each either one batch (mean loss) or two micro-batches whose losses are summed over
    num_items_in_batch, as Trainer does under gradient accumulation. Returns, per step, the losses and the
    gradients of every parameter before the step."""
    # lr 0.01 moves the weights by ~2% a step; at 0.1 these tiny models are chaotic enough that the unpatched
    # fp32 model itself leaves its float64 copy by 2e-5 within three steps
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    record = []
    for step in range(steps):
        micro = [make_batch(seed=10 * step + i) for i in range(2 if accumulate else 1)]
        num_items = sum(targets_in(b) for b in micro) if accumulate else None
        losses = []
        for batch in micro:
            kwargs = {"num_items_in_batch": num_items} if accumulate else {}
            output = model(**batch, **kwargs)
            output.loss.backward()
            losses.append(output.loss.detach())
        record.append((losses, {n: p.grad.clone() for n, p in model.named_parameters()}, output))
        optimizer.step()
        optimizer.zero_grad()
    return record


PATHS = ["fused", "loss"]


@pytest.mark.parametrize("accumulate", [False, True], ids=["one_batch", "accumulation"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(MODELS))
def test_training_matches_unpatched(name, path, accumulate):
    reference = build(name)
    # backend "cpu": these tiny models' logits are small enough that "auto" would take torch's own loss
    patched = apply_fusedce(copy.deepcopy(reference), fused_linear=path == "fused", backend="cpu")
    want, got = train(reference, 3, accumulate), train(patched, 3, accumulate)
    for step, ((want_losses, want_grads, _), (got_losses, got_grads, output)) in enumerate(zip(want, got)):
        for i, (g, w) in enumerate(zip(got_losses, want_losses)):
            assert_rel(g, w, f"step {step} loss {i}")
        for param_name, w in want_grads.items():
            assert_rel(got_grads[param_name], w, f"step {step} grad of {param_name}")
        assert (output.logits is None) == (path == "fused")


@pytest.mark.parametrize("path", PATHS)
def test_accumulation_gives_the_large_batch_gradients(path):
    """Two micro-batches over num_items_in_batch give the gradients of their concatenation's mean."""
    model = apply_fusedce(build("llama"), fused_linear=path == "fused")
    micro = [make_batch(seed=1), make_batch(seed=2)]
    num_items = sum(targets_in(b) for b in micro)
    for batch in micro:
        model(**batch, num_items_in_batch=num_items).loss.backward()
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(**{k: torch.cat([b[k] for b in micro]) for k in micro[0]}).loss.backward()
    for param_name, p in model.named_parameters():
        assert_rel(accumulated[param_name], p.grad, f"grad of {param_name}")


def relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["llama", "gemma2", "phi"])
def test_bfloat16_against_float64(name, path):
    """A bf16 model's loss and gradients against a float64 copy of the same (rounded) weights: the patched
    model is no further from it than the unpatched bf16 model, whose error (the whole network computed in
    bf16) bounds what the loss can be held to."""
    model = build(name, torch.bfloat16)
    reference = copy.deepcopy(model).double()
    unpatched = copy.deepcopy(model)
    apply_fusedce(model, fused_linear=path == "fused")
    batch = make_batch()
    results = {}
    for key, m in (("patched", model), ("unpatched", unpatched), ("reference", reference)):
        loss = m(**batch).loss
        loss.backward()
        results[key] = loss.detach(), {n: p.grad for n, p in m.named_parameters()}
    want_loss, want_grads = results["reference"]
    for key in ("patched", "unpatched"):
        assert results[key][0].dtype == torch.float32  # transformers' loss is fp32 for a bf16 model
    # bf16 rounds to 2^-9 relative: 3 such steps in the loss, the body's error in the gradients; the
    # patched error may exceed the unpatched one by the rounding of the loss itself (one ulp)
    loss_err = abs(results["patched"][0].double() - want_loss).item() / want_loss.item()
    assert loss_err <= 2 ** -7, f"loss relative error {loss_err:.3g}"
    for param_name, want in want_grads.items():
        err = relative_error(results["patched"][1][param_name], want)
        bound = relative_error(results["unpatched"][1][param_name], want)
        assert err <= 1.25 * bound + 2 ** -8, f"grad of {param_name}: {err:.3g}, unpatched bf16 {bound:.3g}"


def test_outputs_outside_training_are_unchanged():
    """Eval with labels (loss path), training without labels, no_grad with labels: logits as before."""
    reference = build("llama")
    patched = apply_fusedce(copy.deepcopy(reference))
    batch = make_batch()
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    for mode in ("train", "eval"):
        for m in (reference, patched):
            m.train(mode == "train")
        got, want = patched(**no_labels), reference(**no_labels)
        assert got.loss is None and want.loss is None
        assert_rel(got.logits, want.logits, f"{mode} logits without labels")
    with torch.no_grad():
        got, want = patched(**batch), reference(**batch)
    assert_rel(got.logits, want.logits, "no_grad logits with labels")
    assert_rel(got.loss, want.loss, "no_grad loss")
    reference.eval()
    patched.eval()
    got, want = patched(**batch), reference(**batch)
    assert_rel(got.loss, want.loss, "eval loss")
    assert_rel(got.logits, want.logits, "eval logits")


def test_fused_output_as_tuple_and_positional_labels():
    reference = build("llama")
    patched = apply_fusedce(copy.deepcopy(reference))
    batch = make_batch()
    want = reference(**batch).loss
    # labels positionally (input_ids, attention_mask, position_ids, cache, inputs_embeds, labels)
    output = patched(batch["input_ids"], batch["attention_mask"], None, None, None, batch["labels"])
    assert output.logits is None
    assert_rel(output.loss, want, "loss with positional labels")
    as_tuple = patched(**batch, return_dict=False)
    assert_rel(as_tuple[0], want, "loss of the tuple output")
    assert len(as_tuple) == len(reference(**batch, return_dict=False)) - 1  # logits left out, as a None is


@pytest.mark.parametrize("path", PATHS)
def test_shift_labels_and_ignore_index(path):
    reference = build("qwen3")
    patched = apply_fusedce(copy.deepcopy(reference), fused_linear=path == "fused")
    batch = make_batch()
    shift = torch.randint(0, VOCAB, batch["labels"].shape)
    shift[0, :3] = 7  # ignored through ignore_index=7
    for m in (reference, patched):
        m(**batch, shift_labels=shift, ignore_index=7).loss.backward()
    assert_rel(patched(**batch, shift_labels=shift, ignore_index=7).loss,
               reference(**batch, shift_labels=shift, ignore_index=7).loss, "loss")
    assert_same_grads(patched, reference)


@pytest.mark.parametrize("keep", [5, "indices"])
def test_logits_to_keep(keep):
    """The head sees only the kept positions; labels for those positions give the unpatched loss."""
    reference = build("gemma2")
    patched = apply_fusedce(copy.deepcopy(reference))
    batch = make_batch(pad=0)
    keep = torch.tensor([0, 3, 4, 9]) if keep == "indices" else keep
    kept = batch["labels"][:, keep] if torch.is_tensor(keep) else batch["labels"][:, -keep:]
    for m in (reference, patched):
        m(**{**batch, "labels": kept}, logits_to_keep=keep).loss.backward()
    assert_rel(patched(**{**batch, "labels": kept}, logits_to_keep=keep).loss,
               reference(**{**batch, "labels": kept}, logits_to_keep=keep).loss, "loss")
    assert_same_grads(patched, reference)
    with pytest.raises(ValueError, match="with logits_to_keep, pass labels"):
        patched(**batch, logits_to_keep=keep)


def reference_from_logits(model, batch, **loss_options):
    """float64 loss of the unpatched model's logits, by torch (z-loss added by hand)."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    target = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].reshape(-1)
    z_loss = loss_options.pop("z_loss", 0.0)
    rows = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target, reduction="none", **loss_options)
    lse = torch.logsumexp(logits.reshape(-1, VOCAB), 1)
    valid = target != -100
    return (rows + z_loss * lse ** 2)[valid].mean()


@pytest.mark.parametrize("path", PATHS)
def test_options_reach_the_loss(path):
    reference = build("gemma2")
    batch = make_batch()
    options = dict(label_smoothing=0.1, z_loss=1e-2)
    want = reference_from_logits(reference, batch, **options)
    patched = apply_fusedce(copy.deepcopy(reference), fused_linear=path == "fused", **options)
    got = patched(**batch).loss
    assert abs(got.double() - want).item() <= TOL * want.item()
    assert abs(reference(**batch).loss.double() - want).item() > 100 * TOL * want.item()  # the options matter


def test_generation_unchanged():
    for name in MODELS:
        reference = build(name).eval()
        patched = apply_fusedce(copy.deepcopy(reference))
        prompt = make_batch(pad=0)["input_ids"][:, :5]
        kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=0)
        got, want = patched.generate(prompt, **kwargs), reference.generate(prompt, **kwargs)
        assert torch.equal(got.sequences, want.sequences), name
        for g, w in zip(got.logits, want.logits):
            assert torch.equal(g, w), name


def test_unknown_model_gets_the_loss_path_with_one_warning():
    """Cohere scales its logits between the head and the loss, which the fused path would drop."""
    config = transformers.CohereConfig(**COMMON, logit_scale=0.5)
    torch.manual_seed(0)
    reference = transformers.CohereForCausalLM(config)
    patched = copy.deepcopy(reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_fusedce(patched)
    messages = [str(w.message) for w in caught if "fusedce" in str(w.message)]
    assert len(messages) == 1 and "CohereForCausalLM" in messages[0] and "loss path" in messages[0], messages
    batch = make_batch()
    got, want = patched(**batch), reference(**batch)
    assert got.logits is not None
    assert_rel(got.loss, want.loss, "loss")


def test_subclass_with_its_own_forward_gets_the_loss_path():
    class Custom(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = Custom(build("llama").config)
    with pytest.warns(UserWarning, match="Custom's forward is not one the fused path knows"):
        apply_fusedce(model)
    assert model(**make_batch()).logits is not None


def test_every_listed_model_is_tested():
    assert {MODELS[name][1] for name in MODELS} == set(FUSED_MODELS)


def test_remove_and_context_manager_restore_the_model():
    model = build("gpt2")
    signature = inspect.signature(model.forward)
    keys = list(model.state_dict())
    batch = make_batch()
    with fusedce_applied(model) as patched:
        assert patched is model
        assert inspect.signature(model.forward) == signature  # Trainer and generate read it
        assert list(model.state_dict()) == keys
        assert model(**batch).logits is None
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert "forward" not in vars(model) and "forward" not in vars(model.lm_head)
    assert model.loss_function is ForCausalLMLoss
    assert model(**batch).logits is not None
    apply_fusedce(model, fused_linear=False)
    remove_fusedce(model)
    assert model.loss_function is ForCausalLMLoss


def test_a_copy_of_a_patched_model_runs_its_own_weights():
    model = apply_fusedce(build("llama"))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.mul_(2)
    batch = make_batch()
    assert not torch.equal(clone(**batch).loss, model(**batch).loss)
    assert clone.forward.__self__ is clone and clone.lm_head.forward.__self__ is clone.lm_head


def test_bad_use_raises():
    model = build("llama")
    with pytest.raises(TypeError, match="unknown options \\['softcap'\\]"):
        apply_fusedce(model, softcap=3.0)
    with pytest.raises(ValueError, match="chunk_size is an option of the fused path"):
        apply_fusedce(model, fused_linear=False, chunk_size=64)
    with pytest.raises(ValueError, match="fusedce is not applied"):
        remove_fusedce(model)
    with pytest.raises(TypeError, match="takes a transformers PreTrainedModel"):
        apply_fusedce(torch.nn.Linear(2, 2))
    apply_fusedce(model)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_fusedce(model)
    remove_fusedce(model)
    model.loss_function = ForCausalLMLoss
    with pytest.raises(ValueError, match="has a loss_function of its own"):
        apply_fusedce(model)
    classifier = transformers.LlamaForSequenceClassification(build("llama").config)
    with pytest.raises(ValueError, match="is for causal language models"):
        apply_fusedce(classifier)


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_loss_and_gradient_scale_are_not_rounded(path):
    """A bf16 model's loss comes back in fp32, as transformers' does, and so does the scale its backward
    hands back: 1/3 is 0.333984375 in bf16, which would make every gradient 2^-9 too large. Measured as
    the median ratio of the gradients with num_items_in_batch=3 and 1 (times 3): the bf16 rounding of
    each element is symmetric and leaves the median at 1, a rounded scale moves it."""
    unpatched = build("llama", torch.bfloat16)
    batch = make_batch()
    grads = {}
    for items in (1, 3):
        patched = apply_fusedce(copy.deepcopy(unpatched), fused_linear=path == "fused")
        loss = patched(**batch, num_items_in_batch=items).loss
        assert loss.dtype == torch.float32
        assert abs(loss.double() / unpatched(**batch, num_items_in_batch=items).loss.double() - 1).item() <= 2 ** -12
        loss.backward()
        grads[items] = torch.cat([p.grad.double().flatten() for p in patched.parameters()])
    large = grads[1].abs() > grads[1].abs().median()
    ratio = (3 * grads[3][large] / grads[1][large]).median().item()
    assert abs(ratio - 1) <= 2 ** -11, f"gradient scale {ratio}"
