"""(j) of :mod:`moe_cpt.trainer.cpu_compat`: on CPU torchtitan's ``GroupedExperts`` computes in fp32.

The reference is a hand-written per-expert loop of torchtitan's formula (``models/common/
moe.py``): for the rows of expert ``e`` (contiguous, in expert order, ``counts[e]`` of them),
``(silu(x @ w1[e].T) * (x @ w3[e].T)) @ w2[e].T`` with ``w1, w3: (E, F, D)``, ``w2: (E, D, F)``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moe_cpt.trainer  # noqa: F401  (triton stub before torchtitan's MoE modules)
from moe_cpt.trainer import cpu_compat
from moe_cpt.trainer.models import SHAPES, build_model_config

# imported after `import trainer` (its triton stub: torchtitan's MoE modules import triton)
_tt_moe = importlib.import_module("torchtitan.models.common.moe")
GroupedExperts, RoutedExperts = _tt_moe.GroupedExperts, _tt_moe.RoutedExperts

pytestmark = pytest.mark.skipif(cpu_compat.cuda_present(), reason="the CPU path only")

REPO = Path(__file__).resolve().parents[2]
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; bf16 rounding alone is ~4e-3 relative
SHAPE = SHAPES["tiny_moe"]  # 8 experts, dim 64, hidden 64
# three experts get no token; expert 5 gets many
COUNTS = [5, 0, 9, 3, 0, 17, 1, 0]


@pytest.fixture(autouse=True)
def _cpu_path() -> None:
    assert cpu_compat.apply()


def _experts(seed: int = 0) -> torch.nn.Module:
    """tiny_moe's routed experts module, built from our model config, with O(1) activations
    (weights ~ N(0, 1/dim)) so that bf16 and fp32 results are far apart at fp32 tolerance."""
    cfg = build_model_config("tiny_moe").layers[0].moe.routed_experts.inner_experts
    experts = cfg.build()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return experts


def _tokens(counts: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), SHAPE.dim, generator=g).requires_grad_(True)
    return x, torch.tensor(counts, dtype=torch.int64)


def reference(x: torch.Tensor, counts: list[int], w1: torch.Tensor, w2: torch.Tensor,
              w3: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-expert loop in ``dtype`` (bf16: torchtitan's casts, its stock path), result in
    ``x``'s dtype."""
    rows, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start:start + n].to(dtype)
        h = F.silu(xe @ w1[e].to(dtype).T) * (xe @ w3[e].to(dtype).T)
        rows.append(h @ w2[e].to(dtype).T)
        start += n
    return torch.cat(rows).to(x.dtype)


class _SpyGroupedMM:
    """Stands in for ``torch._grouped_mm`` (what torchtitan's seam calls) and records dtypes."""

    def __init__(self) -> None:
        self.original = torch._grouped_mm
        self.dtypes: list[tuple[torch.dtype, torch.dtype]] = []

    def __call__(self, A: torch.Tensor, B: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.dtypes.append((A.dtype, B.dtype))
        return self.original(A, B, **kwargs)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _SpyGroupedMM:
    s = _SpyGroupedMM()
    monkeypatch.setattr(torch, "_grouped_mm", s)
    return s


def test_apply_installs_the_fp32_seam_once() -> None:
    seam, forward = GroupedExperts._grouped_mm, GroupedExperts.forward
    assert seam.cpu_fp32 and forward.cpu_fp32 and cpu_compat.fp32_experts_installed()
    # wrappers of torchtitan's own functions, not copies
    for fn, name in ((seam, "_grouped_mm"), (forward, "forward")):
        assert fn.__wrapped__.__module__ == "torchtitan.models.common.moe"
        assert fn.__wrapped__.__qualname__ == f"GroupedExperts.{name}"
        assert not hasattr(fn.__wrapped__, "__wrapped__")
    assert cpu_compat.apply() and not cpu_compat.install_fp32_experts()  # idempotent
    assert GroupedExperts._grouped_mm is seam and GroupedExperts.forward is forward


@pytest.mark.parametrize("counts", [COUNTS, [0, 0, 30, 0, 0, 0, 0, 0], [4] * 8],
                         ids=["some-empty", "one-expert", "balanced"])
def test_fp32_experts_equal_the_per_expert_loop(counts: list[int]) -> None:
    experts = _experts()
    x, n = _tokens(counts)
    out = experts(x, n)
    assert out.dtype == torch.float32 and out.shape == x.shape
    ref = reference(x, counts, experts.w1_EFD, experts.w2_EDF, experts.w3_EFD)
    torch.testing.assert_close(out, ref, **TOL)


def test_fp32_experts_gradients_equal_the_reference() -> None:
    experts = _experts()
    x, n = _tokens(COUNTS)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    params = (experts.w1_EFD, experts.w2_EDF, experts.w3_EFD)
    grads = torch.autograd.grad(experts(x, n), (x, *params), grad_out)
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    x_ref = x.detach().clone().requires_grad_(True)
    ref_grads = torch.autograd.grad(reference(x_ref, COUNTS, *ref_params), (x_ref, *ref_params),
                                    grad_out)
    for got, want, name in zip(grads, ref_grads, ("x", "w1", "w2", "w3"), strict=True):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    for e, c in enumerate(COUNTS):  # an expert without tokens gets exactly no gradient
        if c == 0:
            assert all(float(g[e].abs().max()) == 0.0 for g in grads[1:])


def test_the_seam_sees_fp32_and_the_result_is_not_bf16(spy: _SpyGroupedMM) -> None:
    experts = _experts()
    x, n = _tokens(COUNTS)
    out = experts(x, n)
    assert spy.dtypes == [(torch.float32, torch.float32)] * 3
    w = (experts.w1_EFD, experts.w2_EDF, experts.w3_EFD)
    ref32 = reference(x, COUNTS, *w)
    ref16 = reference(x, COUNTS, *w, dtype=torch.bfloat16)
    # bf16 is far outside the fp32 tolerance on this data, so a bf16 computation would fail
    assert float((ref16 - ref32).detach().abs().max()) > 100 * TOL["atol"]
    torch.testing.assert_close(out, ref32, **TOL)
    # torchtitan's own path is the bf16 one, and it is back only inside the block
    spy.dtypes.clear()
    with cpu_compat.stock_grouped_experts():
        assert not hasattr(GroupedExperts.forward, "cpu_fp32")
        stock = experts(x, n)
    assert spy.dtypes == [(torch.bfloat16, torch.bfloat16)] * 3
    assert GroupedExperts.forward.cpu_fp32 and GroupedExperts._grouped_mm.cpu_fp32
    torch.testing.assert_close(stock, ref16, rtol=2e-2, atol=2e-2)
    assert float((stock - ref32).detach().abs().max()) > 100 * TOL["atol"]


def test_seam_computes_bf16_operands_in_fp32_and_returns_bf16() -> None:
    experts = _experts()
    x, n = _tokens(COUNTS)
    a = x.detach().bfloat16().requires_grad_(True)
    b_t = experts.w1_EFD.detach().bfloat16().transpose(-2, -1).requires_grad_(True)
    offs = torch.cumsum(n, 0, dtype=torch.int32)
    out = GroupedExperts._grouped_mm(experts, A=a, B_t=b_t, offs=offs)
    assert out.dtype == torch.bfloat16
    ref = torch.cat([a[s:e].float() @ b_t[i].float()
                     for i, (s, e) in enumerate(zip([0, *offs[:-1].tolist()], offs.tolist(),
                                                     strict=True))])
    # the fp32 result rounded once to bf16 (a bf16 matmul would round its products as well)
    torch.testing.assert_close(out.float(), ref.bfloat16().float(), rtol=8e-3, atol=1e-5)
    out.float().sum().backward()
    assert a.grad.dtype == torch.bfloat16 and b_t.grad.dtype == torch.bfloat16


def test_routed_experts_layer_equals_the_reference() -> None:
    """Dispatch (sort by expert), fp32 experts, combine (gate-weighted scatter-add)."""
    cfg = build_model_config("tiny_moe").layers[0].moe.routed_experts
    routed = cfg.build()
    assert isinstance(routed, RoutedExperts)
    routed.inner_experts.load_state_dict(_experts().state_dict())
    g = torch.Generator().manual_seed(3)
    B, L, K, E = 2, 12, SHAPE.top_k, SHAPE.num_experts
    ids = torch.randint(0, E - 2, (B, L, K), generator=g)  # experts E-2, E-1 get nothing
    ids[..., 1] = (ids[..., 0] + 1 + torch.randint(0, E - 3, (B, L), generator=g)) % (E - 2)
    scores = torch.rand(B, L, K, generator=g).requires_grad_(True)
    x = torch.randn(B, L, SHAPE.dim, generator=g).requires_grad_(True)
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    assert counts[-2:].tolist() == [0, 0]
    out = routed(x, scores, ids, counts)
    w = [p.detach().clone().requires_grad_(True) for p in
         (routed.inner_experts.w1_EFD, routed.inner_experts.w2_EDF, routed.inner_experts.w3_EFD)]
    x_ref = x.detach().clone().requires_grad_(True)
    s_ref = scores.detach().clone().requires_grad_(True)
    one_hot = [[int(e == i) for i in range(E)] for e in range(E)]  # counts: one token to e
    rows = [sum(s_ref[b, t, k] * reference(x_ref[b, t:t + 1], one_hot[int(ids[b, t, k])], *w)[0]
                for k in range(K)) for b in range(B) for t in range(L)]
    ref = torch.stack(rows).view(B, L, SHAPE.dim)
    torch.testing.assert_close(out, ref, **TOL)
    grad_out = torch.randn(out.shape, generator=g)
    params = (routed.inner_experts.w1_EFD, routed.inner_experts.w2_EDF, routed.inner_experts.w3_EFD)
    got = torch.autograd.grad(out, (x, scores, *params), grad_out)
    want = torch.autograd.grad(ref, (x_ref, s_ref, *w), grad_out)
    for a, b_, name in zip(got, want, ("x", "scores", "w1", "w2", "w3"), strict=True):
        torch.testing.assert_close(a, b_, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_tiny_moe_model_step_runs_its_experts_in_fp32(spy: _SpyGroupedMM) -> None:
    torch.manual_seed(0)
    model = build_model_config("tiny_moe", router="aux_free").build()
    model.init_weights(buffer_device=None)
    model.train()
    tokens = torch.randint(0, SHAPE.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               tokens[:, 1:].reshape(-1))

    fp32 = loss()
    fp32.backward()
    assert spy.dtypes == [(torch.float32, torch.float32)] * (3 * SHAPE.n_layers)
    experts_grads = [p.grad for n, p in model.named_parameters() if "routed_experts" in n]
    assert experts_grads and all(g is not None and g.dtype == torch.float32
                                 and bool(torch.isfinite(g).all()) for g in experts_grads)
    with torch.no_grad(), cpu_compat.stock_grouped_experts():
        bf16 = loss()
    assert abs(float(fp32.detach()) - float(bf16)) < 1e-2  # same model, bf16 only in the experts


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_without_apply_torchtitans_path_is_untouched() -> None:
    out = _run("""
        import torch
        import moe_cpt.trainer
        from moe_cpt.trainer import cpu_compat
        import moe_cpt.trainer.models
        from torchtitan.models.common.moe import GroupedExperts
        assert not cpu_compat.applied() and not cpu_compat.fp32_experts_installed()
        for name in ("forward", "_grouped_mm"):
            fn = getattr(GroupedExperts, name)
            assert fn.__module__ == "torchtitan.models.common.moe", fn
            assert fn.__qualname__ == "GroupedExperts." + name, fn
            assert not hasattr(fn, "__wrapped__") and not hasattr(fn, "cpu_fp32")
        seen = []
        original = torch._grouped_mm
        def spy(A, B, **kw):
            seen.append((A.dtype, B.dtype))
            return original(A, B, **kw)
        torch._grouped_mm = spy
        cfg = moe_cpt.trainer.models.build_model_config("tiny_moe").layers[0].moe.routed_experts
        experts = cfg.inner_experts.build()
        with torch.no_grad():
            for p in experts.parameters():
                p.normal_()
        out = experts(torch.randn(12, 64), torch.tensor([3, 0, 2, 0, 4, 0, 3, 0]))
        assert out.dtype == torch.float32
        assert seen == [(torch.bfloat16, torch.bfloat16)] * 3, seen
        with cpu_compat.stock_grouped_experts():  # a no-op when nothing is installed
            assert GroupedExperts.forward.__qualname__ == "GroupedExperts.forward"
        print("untouched")
    """)
    assert out.strip() == "untouched"


def test_apply_leaves_grouped_experts_alone_with_cuda() -> None:
    out = _run("""
        import moe_cpt.trainer
        from moe_cpt.trainer import cpu_compat
        cpu_compat.cuda_present = lambda: True
        assert cpu_compat.apply() is False
        from torchtitan.models.common.moe import GroupedExperts
        assert GroupedExperts.forward.__qualname__ == "GroupedExperts.forward"
        assert GroupedExperts._grouped_mm.__qualname__ == "GroupedExperts._grouped_mm"
        assert not cpu_compat.fp32_experts_installed()
        print("stock")
    """)
    assert out.strip() == "stock"
