"""Grid tests: every MoE backend against `reference`, forward and backward (fp32)."""

from __future__ import annotations

import pytest
import torch

from concilium.errors import ConfigError
from concilium.experts.moe.kernels import decode, onednn
from concilium.experts.moe.layer import MOE_BACKEND_CLS, SparseMoE, get_backend
from concilium.experts.moe.reference import fuse_w13, reference_moe, shared_swiglu, swiglu

BACKENDS = sorted(set(MOE_BACKEND_CLS) - {"reference"})
D, H = 33, 24  # odd hidden size on purpose
ATOL, RTOL = 1e-5, 1e-4


def make_case(t: int, e: int, k: int, seed: int = 0):
    """x [T, D], w13 [E, 2H, D], w2 [E, D, H], weights [T, K], idxs [T, K]; expert E-1 gets no
    tokens when E > 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, D, generator=g)
    w13 = torch.randn(e, 2 * H, D, generator=g) / D**0.5
    w2 = torch.randn(e, D, H, generator=g) / H**0.5
    idxs = torch.randint(0, max(e - 1, 1), (t, k), generator=g)
    weights = torch.rand(t, k, generator=g)
    return x, w13, w2, weights, idxs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 3, 64, 512])
@pytest.mark.parametrize("e", [1, 8, 16])
@pytest.mark.parametrize("k", [1, 2])
def test_forward_matches_reference(backend: str, t: int, e: int, k: int) -> None:
    x, w13, w2, weights, idxs = make_case(t, e, k)
    with torch.no_grad():
        want = reference_moe(x, w13, w2, weights, idxs)
        got = get_backend(backend)(x, w13, w2, weights, idxs)
    assert got.shape == (t, D)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def _grads(fn, case):
    leaves = [c.clone().requires_grad_(c.is_floating_point()) for c in case]
    y = fn(*leaves)
    y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
    return y, [leaf.grad for leaf in leaves if leaf.is_floating_point()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 3, 64, 512])
@pytest.mark.parametrize("e", [1, 8, 16])
@pytest.mark.parametrize("k", [1, 2])
def test_backward_matches_reference(backend: str, t: int, e: int, k: int) -> None:
    case = make_case(t, e, k, seed=2)
    y_ref, g_ref = _grads(reference_moe, case)
    y, g = _grads(get_backend(backend), case)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    for name, got, want in zip(["x", "w13", "w2", "weights"], g, g_ref, strict=True):
        # gradients are sums over up to T*K pairs: fp32 order error scales with the largest entry
        atol = ATOL * max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want, atol=atol, rtol=RTOL, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_null_slots_add_nothing(backend: str) -> None:
    x, w13, w2, weights, idxs = make_case(16, 8, 2, seed=3)
    idxs[::2, 1] = -1  # AdaMoE null expert
    idxs[1::4, 0] = 8  # an out-of-range sentinel
    keep = (idxs >= 0) & (idxs < 8)
    with torch.no_grad():
        got = get_backend(backend)(x, w13, w2, weights, idxs)
    want = reference_moe(x, w13, w2, weights * keep, idxs.clamp(0, 7))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_all_slots_null_gives_zeros() -> None:
    x, w13, w2, weights, _ = make_case(5, 4, 2)
    idxs = torch.full((5, 2), -1)
    for backend in BACKENDS:
        assert torch.count_nonzero(get_backend(backend)(x, w13, w2, weights, idxs)) == 0


def test_reference_is_the_dense_sum() -> None:
    """The reference itself against the formula, one token at a time."""
    x, w13, w2, weights, idxs = make_case(4, 8, 2, seed=4)

    def one(t: int, j: int) -> torch.Tensor:
        e = idxs[t, j]
        return weights[t, j] * swiglu(x[t : t + 1], w13[e], w2[e])[0]

    want = torch.stack([one(t, 0) + one(t, 1) for t in range(4)])
    torch.testing.assert_close(reference_moe(x, w13, w2, weights, idxs), want)


def test_sparse_moe_layer_with_gated_shared_expert() -> None:
    moe = SparseMoE(8, D, H, shared_hidden=16, shared_gate=True, backend="grouped")
    x, _, _, weights, idxs = make_case(7, 8, 2, seed=5)
    y = moe(x, weights, idxs)
    assert moe.shared_w13 is not None and moe.shared_w2 is not None
    routed = reference_moe(x, moe.w13, moe.w2, weights, idxs)
    shared = shared_swiglu(x, moe.shared_w13, moe.shared_w2, moe.shared_gate)
    torch.testing.assert_close(y, routed + shared, atol=ATOL, rtol=RTOL)
    y.sum().backward()
    assert moe.w13.grad is not None and moe.shared_gate is not None
    assert moe.shared_gate.grad is not None and moe.shared_gate.grad.abs().sum() > 0


def test_w1_w3_are_views_of_w13() -> None:
    moe = SparseMoE(4, D, H)
    assert moe.w1.shape == moe.w3.shape == (4, H, D)
    torch.testing.assert_close(fuse_w13(moe.w1, moe.w3), moe.w13.detach())
    assert moe.w1.data_ptr() == moe.w13.data_ptr()


def test_bad_shapes_and_unknown_backend_are_rejected() -> None:
    moe = SparseMoE(4, D, H)
    with pytest.raises(ValueError, match="expected x"):
        moe(torch.randn(3, D), torch.rand(3, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match="grouped"):
        SparseMoE(4, D, H, backend="nope")


@pytest.mark.parametrize("t", [1, 5, 64])
def test_grouped_mm_aligned_path(monkeypatch: pytest.MonkeyPatch, t: int) -> None:
    """D = 32 is 16-byte aligned, so `grouped_mm` really calls torch._grouped_mm here."""
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real_grouped_mm = torch._grouped_mm

    def recording(a: torch.Tensor, b: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real_grouped_mm(a, b, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "_grouped_mm", recording)
    g = torch.Generator().manual_seed(6)
    x, w13, w2 = torch.randn(t, 32, generator=g), torch.randn(8, 48, 32), torch.randn(8, 32, 24)
    idxs, weights = torch.randint(0, 7, (t, 2), generator=g), torch.rand(t, 2, generator=g)
    with torch.no_grad():
        got = get_backend("grouped_mm")(x, w13, w2, weights, idxs)
    torch.testing.assert_close(got, reference_moe(x, w13, w2, weights, idxs), atol=1e-4, rtol=1e-4)
    # one call per projection over all T*K slots: w13 [E, 2H, D] then w2 [E, D, H], transposed
    assert calls == [((2 * t, 32), (8, 32, 48)), ((2 * t, 24), (8, 24, 32))]


@pytest.mark.parametrize("backend", ["grouped", "decode", "auto"])
def test_packed_weights_follow_in_place_updates(backend: str) -> None:
    """An optimizer step changes w13 in place; inference must not use stale packed weights."""
    moe = SparseMoE(8, D, H, backend=backend)
    x, _, _, weights, idxs = make_case(3, 8, 2, seed=7)
    with torch.no_grad():
        moe(x, weights, idxs)
        moe.w13.mul_(2.0)
        got = moe(x, weights, idxs)
        want = reference_moe(x, moe.w13, moe.w2, weights, idxs)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not onednn.available(), reason="no oneDNN in this torch build")
@pytest.mark.parametrize(
    ("backend", "t"), [("grouped", 8), ("decode", 3), ("auto", 3), ("auto", 8)]
)
def test_training_builds_no_packed_weights(
    monkeypatch: pytest.MonkeyPatch, backend: str, t: int
) -> None:
    """Grad mode never uses the packs, so it must not build them: each optimizer step changes
    the weights, and repacking every expert per forward costs a full copy for nothing."""
    packs: list[int] = []
    real_pack = onednn.pack
    monkeypatch.setattr(onednn, "pack", lambda *a, **k: packs.append(1) or real_pack(*a, **k))
    moe = SparseMoE(8, 256, 512, backend=backend)  # experts over AutoBackend's small size
    g = torch.Generator().manual_seed(8)
    x, weights = torch.randn(t, 256, generator=g), torch.rand(t, 2, generator=g)
    idxs = torch.randint(0, 8, (t, 2), generator=g)
    moe(x, weights, idxs).sum().backward()
    assert packs == []
    with torch.no_grad():  # inference still packs, once
        moe(x, weights, idxs)
        moe(x, weights, idxs)
    assert packs == [1]


@pytest.mark.parametrize("backend", ["decode", "auto", "grouped"])
def test_a_token_routed_twice_to_one_expert_gets_both_weights(backend: str) -> None:
    x, w13, w2, _, _ = make_case(3, 4, 2, seed=9)
    idxs = torch.tensor([[1, 1], [1, 0], [2, -1]])  # token 0 twice on expert 1; a null slot
    weights = torch.tensor([[0.25, 0.5], [0.75, 0.125], [1.0, 3.0]])
    with torch.no_grad():
        got = get_backend(backend)(x, w13, w2, weights, idxs)
    torch.testing.assert_close(got, reference_moe(x, w13, w2, weights, idxs), atol=ATOL, rtol=RTOL)
    assert decode.pairs_by_expert(weights, idxs, 4) == {
        0: ([1], [0.125]),
        1: ([0, 0, 1], [0.25, 0.5, 0.75]),
        2: ([2], [1.0]),
    }
