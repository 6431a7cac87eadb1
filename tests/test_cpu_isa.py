"""The CPU kernels are compiled for AVX-512, AVX2 and baseline x86-64 and picked at run time (a build
without x86-64 code has the baseline only); each variant this CPU and build can run is checked here in
a subprocess with FUSEDCE_CPU_ISA forcing it."""
import os
import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F, fusedce
    from fusedce import _C as _native
    try:
        isa = _native.isa()
    except ValueError as e:  # FUSEDCE_CPU_ISA names a set this CPU lacks
        print("unsupported:", e); sys.exit(3)
    if isa != sys.argv[1]:
        print("unsupported:", isa); sys.exit(3)
    torch.manual_seed(0)
    tol = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float64: 1e-10}
    for dtype in tol:
        for vocab in (7, 1000, 4099):
            x = (torch.randn(9, vocab) * 3).to(dtype)
            t = torch.randint(0, vocab, (9,)); t[3] = -100
            q = torch.softmax(torch.randn(9, vocab), 1).to(dtype)
            w = torch.rand(vocab) + 0.5
            for target, kw in [(t, {}), (t, dict(weight=w.to(dtype), label_smoothing=0.1)), (q, {}),
                               (t, dict(softcap=4.0, z_loss=1e-3))]:
                for fused in (False, True):
                    xx = x.clone().requires_grad_()
                    loss = fusedce.cross_entropy(xx, target, fused=fused, backend="cpu", **kw)
                    loss.backward()
                    x64 = x.detach().double().clone().requires_grad_()
                    cap = kw.get("softcap")
                    xc = cap * torch.tanh(x64 / cap) if cap else x64
                    ref = F.cross_entropy(xc, target.double() if target.is_floating_point() else target,
                                          weight=kw["weight"].double() if "weight" in kw else None,
                                          label_smoothing=kw.get("label_smoothing", 0.0))
                    if "z_loss" in kw:
                        ref = ref + kw["z_loss"] * (torch.logsumexp(xc, 1)[t != -100] ** 2).mean()
                    ref.backward()
                    torch.testing.assert_close(loss.double(), ref, rtol=tol[dtype], atol=tol[dtype])
                    scale = x64.grad.abs().max().item()
                    torch.testing.assert_close(xx.grad.double(), x64.grad, rtol=tol[dtype], atol=tol[dtype] * scale)
    print("ok", _native.isa())
""")


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_instruction_set_variant(isa):
    env = dict(os.environ, FUSEDCE_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", CHECK, isa], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"this CPU cannot run the {isa} kernels ({proc.stdout.strip()})")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"ok {isa}"


def test_unknown_instruction_set_is_an_error():
    env = dict(os.environ, FUSEDCE_CPU_ISA="avx9000")
    code = "import torch, fusedce; fusedce.cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]), backend='cpu')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ValueError: FUSEDCE_CPU_ISA=avx9000: expected " in proc.stderr  # ... the sets this build has
    assert "baseline" in proc.stderr.splitlines()[-1]
