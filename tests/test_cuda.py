"""The CUDA C++ backend: its launch planning and packaging (on any machine), and on a GPU every launch
layout against float64, agreement with the Triton and CPU backends, and CUDA-graph capture. The shared
grid (test_parity, test_extras, test_ops) runs it too when there is a GPU."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fusedce
from fusedce.backends import cuda as cuda_backend
from reference import assert_close, reference_loss, to64

native = cuda_backend._cuda
needs_module = pytest.mark.skipif(native is None, reason=f"built without the CUDA kernels: {cuda_backend.IMPORT_ERROR}")
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and native is not None),
                               reason="needs a CUDA device and the CUDA kernels")
pytestmark = needs_module  # the planner and the launch checks are the module's, with or without a GPU
W, B, C, CL = range(4)  # enum Layout in csrc/cuda/params.h
if native is not None:
    assert native.LAYOUTS == ("warp_per_row", "block_per_row", "block_per_row_cached", "cluster_row_cached")
    H100 = native.DeviceInfo(sms=132, threads_per_sm=2048, l2_bytes=50 << 20, clusters=True)
    A100 = native.DeviceInfo(sms=108, threads_per_sm=2048, l2_bytes=40 << 20)  # sm_80: no clusters

# FUSEDCE_ARGS of csrc/cuda/module.cpp, in order, for a plain forward of 4 x 100 fp32 rows (no memory is
# touched: the tests below stop at the planner or at the launch checks)
ARG_NAMES = ("logits", "logits_row_stride", "rows", "vocab", "dtype", "target", "target_is_prob",
             "target_row_stride", "target_dtype", "weight", "weight_sum", "ignore_index", "label_smoothing",
             "z_loss", "softcap", "lse", "grad_loss", "grad_stride", "dlogits", "dlogits_row_stride", "class_start",
             "classes", "target_mass", "states")
ARGS = dict(logits=1 << 20, logits_row_stride=100, rows=4, vocab=100, dtype=0, target=2 << 20, target_is_prob=False,
            target_row_stride=0, target_dtype=0, weight=0, weight_sum=0, ignore_index=-100, label_smoothing=0.0,
            z_loss=0.0, softcap=0.0, lse=3 << 20, grad_loss=0, grad_stride=0, dlogits=0, dlogits_row_stride=0,
            class_start=0, classes=100, target_mass=0, states=0)


def args(**overrides):
    values = dict(ARGS, **overrides)
    return tuple(values[name] for name in ARG_NAMES)


def plan(rows, vocab, element_size, fused=False, device=None, **kwargs):
    dtype = torch.float32 if element_size == 4 else torch.bfloat16
    return cuda_backend.plan(rows, vocab, dtype, H100 if device is None else device, fused=fused, **kwargs)


# ---- launch planning (csrc/cuda/plan.cpp) ----------------------------------------------------------


def test_short_rows_get_a_warp_each():
    p = plan(10000, 1000, 4)
    assert p.layout == W and p.threads == 256 and p.splits == 1
    # 8 rows per block, a full GPU of blocks: 1024 threads per SM, as many as the registers hold
    assert p.blocks == min(-(-10000 // 8), 132 * 1024 // 256)


@pytest.mark.parametrize("vocab,element_size", [(32000, 4), (32003, 4), (65536, 2), (2000, 4)])
def test_fused_rows_that_fit_are_held_in_registers(vocab, element_size):
    p = plan(16384, vocab, element_size, fused=True)
    assert p.layout == C
    assert p.threads * native.CACHE_PACKS * (16 // element_size) >= vocab  # the whole row
    assert p.threads <= native.CACHED_THREADS and p.threads % 32 == 0


@pytest.mark.parametrize("why", ["general", "not_vectorized", "too_long"])
def test_register_cache_only_where_it_applies(why):
    kwargs = dict(general=why == "general", vectorized=why != "not_vectorized")
    vocab = 300000 if why == "too_long" else 32000  # 1.2 MB rows: more than a cluster's registers hold
    p = plan(16384, vocab, 4, fused=True, **kwargs)
    assert p.layout == B and p.splits == 1
    # the fused mode re-reads each row for its gradient: the rows in flight must fit in half the L2
    assert p.blocks <= max(132, (25 << 20) // (vocab * 4))


@pytest.mark.parametrize("vocab,element_size,parts", [
    (128256, 2, 2), (262144, 2, 4), (262144, 4, 8), (50257, 4, 2), (65537, 2, 2), (40000, 4, 2)])
def test_fused_long_rows_are_held_by_a_cluster(vocab, element_size, parts):
    threads = native.CACHED_THREADS
    p = plan(1024, vocab, element_size, fused=True)
    assert (p.layout, p.splits, p.threads) == (CL, parts, threads)
    assert p.blocks == 1024  # a block per (row, segment): the hardware schedules whole clusters
    # each block's segment fits in its registers; half as many blocks would not hold the row
    per_pack = 16 // element_size
    assert native.segment_length(vocab, parts) <= threads * native.CACHE_PACKS * per_pack
    assert native.segment_length(vocab, parts // 2) > threads * native.CACHE_PACKS * per_pack


@pytest.mark.parametrize("why", ["no_clusters", "general", "not_fused", "not_vectorized", "too_few_rows"])
def test_cluster_layout_only_where_it_applies(why):
    p = plan(16 if why == "too_few_rows" else 1024, 262144, 2, fused=why != "not_fused", general=why == "general",
             vectorized=why != "not_vectorized", device=A100 if why == "no_clusters" else H100)
    assert p.layout == B
    if why == "too_few_rows":  # 16 clusters of 8 blocks leave SMs idle: split rows fill the GPU instead
        assert p.splits > 8


def test_few_long_rows_are_split_to_fill_the_gpu():
    p = plan(64, 262144, 2)
    assert p.layout == B and p.blocks == 64
    assert p.splits * 64 >= 132 * 2  # two resident 512-thread blocks per SM
    small = plan(64, 16384, 4)  # 64 KiB rows in 16 KiB segments: threads sized for a segment, not the row
    assert small.splits == 4 and small.threads == 256
    # one row: as many segments as keep each at least SEGMENT_MIN_BYTES long
    assert plan(1, 262144, 2).splits == 262144 * 2 // native.SEGMENT_MIN_BYTES
    assert plan(4, 262144, 2, soft=True).splits == 1  # probability targets: K needs the whole row
    # the fused mode too: fewer rows than SMs would leave most of the GPU idle in the cached layout
    fused = plan(64, 32000, 4, fused=True)
    assert fused.layout == B and fused.splits > 1
    # unless clusters of two fill it: each row still read once
    paired = plan(100, 32000, 4, fused=True)
    assert (paired.layout, paired.splits) == (CL, 2)


def test_many_long_rows_are_not_split():
    p = plan(8192, 128256, 2)
    assert p.splits == 1 and p.threads == 512 and p.blocks == 132 * 1024 // 512
    assert plan(300, 128256, 2).splits == 1  # 300 rows already fill the 264 resident blocks


def test_plan_follows_the_resident_threads_of_the_gpu():
    # 64 registers a thread: an SM's 64K registers hold 1024 threads, below the 2048 (sm_90) or 1536 (sm_89)
    # it could schedule; the cached layout's 512-thread blocks, at 128 registers a thread, run one per SM
    ada = native.DeviceInfo(sms=128, threads_per_sm=1536, l2_bytes=72 << 20)
    assert plan(8192, 128256, 2, device=ada).blocks == 128 * 1024 // 512
    cached = plan(16384, 32000, 4, fused=True)
    assert (cached.layout, cached.threads, cached.blocks) == (C, 512, 132)
    # where the registers would hold more, the SM's thread limit binds
    roomy = native.DeviceInfo(sms=128, threads_per_sm=1536, l2_bytes=72 << 20, regs_per_sm=1 << 17)
    assert plan(8192, 128256, 2, device=roomy).blocks == 128 * 1536 // 512
    assert plan(10000, 1000, 4, device=roomy).blocks == 128 * 1536 // 256


def test_shard_plans():
    """A vocabulary-parallel shard's states: a forward's layouts, never the cached ones (no gradient), every row's
    state in the workspace; probability targets' rows split where a shard's K is given or not needed."""
    for rows, vocab, layout in ((16384, 32000, B), (10000, 1000, W)):
        states = plan(rows, vocab, 4, shard="states")
        assert states.layout == layout and states.splits == 1
        assert native.workspace_floats(rows, True, states) == rows * 5
        assert native.workspace_floats(rows, False, states) == 0
    split = plan(4, 262144, 2, shard="states")
    assert native.workspace_floats(4, True, split) == 4 * split.splits * 5 and split.splits > 1
    for shard in ("states", "backward"):
        assert plan(4, 262144, 2, soft=True, shard=shard).splits == plan(4, 262144, 2).splits > 1


SHARD_ARGS = dict(class_start=300, classes=1000)


@pytest.mark.skipif(torch.cuda.is_available(), reason="without a GPU the launch checks are all a call runs")
@pytest.mark.parametrize("rows,vocab,soft", [(4, 262144, True), (16384, 32000, False), (1000, 1000, False)])
def test_shard_plans_pass_the_launch_checks(rows, vocab, soft):
    shape = dict(rows=rows, vocab=vocab, logits_row_stride=vocab, target_is_prob=soft,
                 target_row_stride=vocab if soft else 0, weight=6 << 20, label_smoothing=0.1, **SHARD_ARGS)
    a = args(states=9 << 20, **shape)
    launch = native.plan(*a, False, H100)
    with pytest.raises(RuntimeError, match="cudaGetDevice failed"):
        native.forward(*a, launch, 0, 0, 0, 8 << 20)
    a = args(target_mass=9 << 20, grad_loss=4 << 20, dlogits=5 << 20, dlogits_row_stride=vocab, **shape)
    with pytest.raises(RuntimeError, match="cudaGetDevice failed"):
        native.backward(*a, native.plan(*a, False, H100), 0, 0)


@pytest.mark.parametrize("launch,overrides", [
    ({}, dict(states=9 << 20)),  # its rows' states go through the workspace
    (dict(layout=C, threads=128), dict(states=9 << 20, workspace=16, grad_loss=8)),  # no fused shard states
    ({}, dict(states=9 << 20, workspace=16, grad_loss=8)),
    (dict(splits=4), dict(workspace=16, target_is_prob=True, target_row_stride=100)),  # K needs the whole row
])
def test_bad_shard_launches_are_rejected(launch, overrides):
    with pytest.raises(ValueError, match="invalid launch"):
        forward_launch(launch, **overrides)


def test_module_is_built_for_the_promised_architectures():
    archs = native.archs.split()
    assert {"sm_80", "sm_86", "sm_89", "sm_90"} <= set(archs), archs


def test_cuda_backend_rejects_cpu_tensors():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot serve this input: it runs on CUDA tensors, "
                                           "got a cpu tensor"):
        fusedce.cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]), backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_errors_reach_python_with_their_message():
    with pytest.raises(RuntimeError, match="fusedce CUDA kernels: cudaDeviceGetAttribute failed: cuda"):
        native.device_info(0)


def forward_launch(launch=None, **overrides):
    """The module's forward with explicit arguments and launch (a block per row of 128 threads by default)."""
    launch = dict(dict(layout=B, threads=128, blocks=4, splits=1, vectorized=True), **(launch or {}))
    workspace = overrides.pop("workspace", 0)
    native.forward(*args(**overrides), native.Launch(**launch), 0, 0, 7 << 20, workspace)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
@pytest.mark.parametrize("launch, overrides", [({}, {}), (dict(layout=CL, splits=2), dict(grad_loss=8))],
                         ids=["block_per_row", "cluster"])
def test_valid_launches_pass_the_checks(launch, overrides):
    """The launches the bad ones below differ from: they fail only at the first CUDA call (no driver here)."""
    with pytest.raises(RuntimeError, match="cudaGetDevice failed"):
        forward_launch(launch, **overrides)


@pytest.mark.parametrize("launch,overrides,message", [
    (dict(layout=7), {}, "invalid launch \\(layout 7"),
    (dict(threads=48), {}, "invalid launch"),
    (dict(layout=C), {}, "invalid launch"),  # only for the fused mode
    (dict(layout=CL, splits=2), {}, "invalid launch"),  # likewise
    (dict(layout=CL, splits=9), dict(grad_loss=8), "invalid launch"),  # > 8 blocks
    (dict(layout=CL, splits=2), dict(grad_loss=8, label_smoothing=0.1), "invalid launch"),
    # segments of 200000 elements, registers for 512 x 16 x 4
    (dict(layout=CL, splits=2, threads=512), dict(grad_loss=8, vocab=400000, logits_row_stride=400000),
     "invalid launch"),
    (dict(layout=C, threads=1024), dict(grad_loss=8), "invalid launch"),  # more threads than the cache is built for
    (dict(splits=4), {}, "invalid launch"),  # a split forward needs its workspace
    (dict(splits=0), dict(workspace=16), "invalid launch"),
    ({}, dict(dlogits=8, dlogits_row_stride=100), "different offsets from a 16-byte boundary"),
    ({}, dict(dlogits=16, dlogits_row_stride=101), "different offsets from a 16-byte boundary"),  # 4-byte rows apart
    ({}, dict(vocab=1 << 30), "1073741824 classes; at most 2\\^30 - 1 are supported"),
    ({}, dict(dtype=3), "unsupported dtype code 3"),
])
def test_native_module_rejects_bad_launches_before_touching_the_gpu(launch, overrides, message):
    """The launch checks run before any CUDA call, so they raise the same with or without a GPU."""
    with pytest.raises((ValueError, RuntimeError), match=message):
        forward_launch(launch, **overrides)


CUDA_SOURCES = Path(__file__).resolve().parents[1] / "csrc" / "cuda"


@pytest.mark.skipif(shutil.which("nvcc") is None or not CUDA_SOURCES.is_dir(),
                    reason="needs nvcc and the sources in csrc/cuda")
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_gradient_packs_leave_in_16_byte_stores(dtype, tmp_path):
    """In the kernels that move 16-byte packs, each pack of the gradient is one 16-byte store. nvcc 13.0
    splits a plain C++ uint4 store into 4-byte ones there (four times the store instructions for the
    same bytes), which is why store() in kernels.cuh writes PTX."""
    ptx = tmp_path / "kernels.ptx"
    subprocess.run(["nvcc", "-ptx", "-arch=sm_90", "-O3", "-std=c++17", str(CUDA_SOURCES / f"kernels_{dtype}.cu"),
                    "-o", str(ptx)], check=True, capture_output=True)
    entries = {body.split("(")[0]: body for body in ptx.read_text().split(".entry ")[1:]}
    cached = [name for name in entries if "cached_row_kernel" in name]
    # the 16-byte kernels that write a gradient: (warp, block) x general x (backward, fused)
    vector_rows = [name for name in entries
                   if re.search(r"10row_kernelI(f|13__nv_bfloat16)Li[48]ELi(0|32)ELb[01]ELi[45]E", name)]
    assert len(cached) == 2 and len(vector_rows) == 8, list(entries)  # cached: (fused, cluster)
    for name in cached + vector_rows:
        assert entries[name].count("st.global.v4.") >= (native.CACHE_PACKS if name in cached else 1), name
        assert "st.global.v2." not in entries[name], name


# ---- on a GPU ------------------------------------------------------------------------------------------

# (rows, vocab, dtype, fused, case, the layout and splits they get on an H100): every launch path
W, B, C, CL = (W, B, C,
                CL)
LAYOUT_CASES = {
    "warp_per_row": (600, 1000, torch.float32, False, {}, (W, 1)),
    "warp_per_row_fused_general": (600, 999, torch.bfloat16, True, dict(label_smoothing=0.1, weight=True), (W, 1)),
    "cached": (3000, 32000, torch.float32, True, {}, (C, 1)),
    "cached_unaligned_rows": (3000, 32003, torch.float32, True, {}, (C, 1)),
    "block_fused_l2": (3000, 32000, torch.float32, True, dict(softcap=30.0, z_loss=1e-4), (B, 1)),
    "cluster_bf16_128k": (600, 128256, torch.bfloat16, True, {}, (CL, 2)),
    "cluster_fp32_1mib": (200, 262144, torch.float32, True, dict(z_loss=1e-4), (CL, 8)),
    "cluster_unaligned_rows": (300, 50257, torch.float32, True, {}, (CL, 2)),
    "block_fused_past_clusters": (600, 300000, torch.float32, True, {}, (B, 1)),
    "split_rows": (2, 262144, torch.bfloat16, True, {}, (B, 32)),
    "split_rows_general": (3, 50257, torch.float32, True, dict(label_smoothing=0.2), (B, 12)),
    "split_rows_backward": (40, 32000, torch.float32, False, dict(weight=True), (B, 7)),
    "soft_targets": (700, 5000, torch.float16, True, dict(soft=True), (B, 1)),
    "backward_only": (3000, 32000, torch.float32, False, dict(weight=True), (B, 1)),
}


def plan_case(name, device=None):
    """(layout, splits) a device gets for LAYOUT_CASES[name]."""
    rows, vocab, dtype, fused, case, _ = LAYOUT_CASES[name]
    general = any(k in case for k in ("weight", "soft", "label_smoothing", "softcap"))
    p = cuda_backend.plan(rows, vocab, dtype, H100 if device is None else device, fused=fused, general=general,
                          soft="soft" in case)
    return p.layout, p.splits


@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_layout_cases_reach_their_layout_on_an_h100(name):
    assert plan_case(name) == LAYOUT_CASES[name][-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="without a GPU the launch checks are all a forward runs")
@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_every_plan_passes_the_launch_checks(name):
    """The planner and check_launch share their rules (params.h): what one plans, the other runs (here
    the forward gets past its checks to the first CUDA call, which fails without a driver)."""
    rows, vocab, dtype, fused, case, _ = LAYOUT_CASES[name]
    soft = "soft" in case
    a = args(rows=rows, vocab=vocab, logits_row_stride=vocab, dtype=cuda_backend.DTYPE_CODES[dtype],
             target_is_prob=soft, target_row_stride=vocab if soft else 0,
             weight=(6 << 20) if "weight" in case else 0, label_smoothing=case.get("label_smoothing", 0.0),
             softcap=case.get("softcap", 0.0), **(dict(grad_loss=4 << 20, dlogits=5 << 20) if fused else {}))
    launch = native.plan(*a, fused, H100)
    with pytest.raises(RuntimeError, match="cudaGetDevice failed"):
        native.forward(*a, launch, 0, 0, 7 << 20, 8 << 20 if native.workspace_floats(rows, False, launch) else 0)


def _inputs(rows, vocab, dtype, case):
    logits = (torch.randn(rows, vocab, device="cuda") * 3).to(dtype)
    if case.get("soft"):
        target = torch.softmax(torch.randn(rows, vocab, device="cuda"), 1).to(dtype)
    else:
        target = torch.randint(0, vocab, (rows,), device="cuda")
        target[::7] = -100
    weight = torch.rand(vocab, device="cuda").add(0.5) if case.get("weight") else None
    options = {k: case[k] for k in ("label_smoothing", "z_loss", "softcap") if k in case}
    return logits, target, weight, options


def _skip_unless_planned_here(name):
    """The GPU tests below are about one layout each: skip where this GPU would plan another."""
    here, expected = plan_case(name, native.device_info(torch.cuda.current_device())), LAYOUT_CASES[name][-1]
    if here != expected:
        pytest.skip(f"{torch.cuda.get_device_name()} plans layout and splits {here} for this case, not {expected}")


@needs_gpu
@pytest.mark.parametrize("rows_in_flight", [None, 3], ids=["planned", "3_blocks_loop_over_rows"])
@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_every_layout_matches_float64(name, rows_in_flight, monkeypatch):
    _skip_unless_planned_here(name)
    if rows_in_flight:  # a grid of 3 blocks along the rows: every block loops over many rows
        planned = native.plan

        def fewer_blocks(*a):
            p = planned(*a)
            return native.Launch(p.layout, p.threads, rows_in_flight, p.splits, p.vectorized)
        monkeypatch.setattr(native, "plan", fewer_blocks)
    rows, vocab, dtype, fused, case, _ = LAYOUT_CASES[name]
    logits, target, weight, options = _inputs(rows, vocab, dtype, case)
    x = logits.clone().requires_grad_()
    x64 = to64(logits).requires_grad_()
    loss = fusedce.cross_entropy(x, target, weight, reduction="sum", fused=fused, backend="cuda", **options)
    ref = reference_loss(x64, to64(target), to64(weight), reduction="sum", **options)
    assert_close(loss, ref, dtype, scale=ref.abs().item())
    loss.backward()
    ref.backward()
    assert_close(x.grad, x64.grad, dtype, scale=x64.grad.abs().max().item())


@needs_gpu
@pytest.mark.parametrize("name", ["cached", "cluster_bf16_128k", "cluster_unaligned_rows"])
def test_cached_layouts_write_the_gradient_in_place(name):
    """In place, a block's gradient stores overwrite logits: each reads its target logit before any
    block of its row (in a cluster, any block of the cluster) may store."""
    _skip_unless_planned_here(name)
    rows, vocab, dtype, _, case, _ = LAYOUT_CASES[name]
    logits, target, _, _ = _inputs(rows, vocab, dtype, case)
    leaf = logits.clone().requires_grad_()
    fusedce.cross_entropy(leaf * 1, target, reduction="sum", inplace_backward=True, backend="cuda").backward()
    x64 = to64(logits).requires_grad_()
    reference_loss(x64, to64(target), reduction="sum").backward()
    assert_close(leaf.grad, x64.grad, dtype, scale=x64.grad.abs().max().item())


@needs_gpu
@pytest.mark.parametrize("fused", [False, True])
def test_logits_offset_from_their_gradient_take_the_scalar_path(fused):
    """Logits 1 element into their storage: they and a fresh gradient differ in 16-byte alignment."""
    base = torch.randn(512, 4097, device="cuda", requires_grad=True)
    logits = base[:, 1:]
    assert (logits.data_ptr() - torch.empty(logits.shape, device="cuda").data_ptr()) % 16 != 0
    target = torch.randint(0, 4096, (512,), device="cuda")
    fusedce.cross_entropy(logits, target, fused=fused, backend="cuda").backward()
    x64 = to64(logits).requires_grad_()
    reference_loss(x64, target).backward()
    assert_close(base.grad[:, 1:], x64.grad, torch.float32, scale=x64.grad.abs().max().item())


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [7, 4000, 32003, 131072])
def test_backends_agree(dtype, vocab):
    """cuda vs triton vs cpu on the same inputs: per-row loss, lse and gradients."""
    rows = 96
    logits = (torch.randn(rows, vocab, device="cuda") * 4).to(dtype)
    target = torch.randint(0, vocab, (rows,), device="cuda")
    options = dict(label_smoothing=0.1, z_loss=1e-4, return_lse=True, reduction="none")
    results = {}
    for backend in ("cuda", "triton", "cpu"):
        device = "cpu" if backend == "cpu" else "cuda"
        x = logits.to(device, copy=True).requires_grad_()  # a fresh leaf per backend: grads must not add up
        loss, lse = fusedce.cross_entropy(x, target.to(device), backend=backend, **options)
        loss.backward(torch.linspace(0.5, 1.5, rows, device=device, dtype=loss.dtype))
        results[backend] = [t.detach().double().cpu() for t in (loss, lse, x.grad)]
    for other in ("triton", "cpu"):
        for got, want in zip(results["cuda"], results[other]):
            assert_close(got, want, dtype, scale=max(1.0, want.abs().max().item()))


@needs_gpu
@pytest.mark.parametrize("vocab,dtype", [(32000, torch.float32), (128256, torch.bfloat16)],
                         ids=["cached", "cluster_on_sm90"])
def test_fused_step_replays_in_a_cuda_graph(vocab, dtype):
    """No allocation the graph cannot own and no host sync: forward + backward capture and replay."""
    logits = torch.randn(256, vocab, device="cuda").to(dtype)
    target = torch.randint(0, vocab, (256,), device="cuda")
    x = logits.clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
        fusedce.cross_entropy(x, target, backend="cuda").backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss = fusedce.cross_entropy(x, target, backend="cuda")
        loss.backward()
    x.data.copy_(logits * 2)  # new inputs, same buffers
    graph.replay()
    x64 = (logits * 2).double().requires_grad_()
    ref = reference_loss(x64, target)
    ref.backward()
    assert_close(loss, ref, dtype, scale=ref.item())
    assert_close(x.grad, x64.grad, dtype, scale=x64.grad.abs().max().item())
