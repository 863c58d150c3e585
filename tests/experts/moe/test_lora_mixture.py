"""The MoE-LoRA layer: every backend matches ``reference`` forward and backward over a grid."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from concilium.errors import ConfigError, InvalidInput
from concilium.experts.moe.lora_backends import LORA_BACKENDS, get_backend
from concilium.experts.moe.lora_mixture import LoRAMixture, LoRAWeights, stack_adapters

D, DOUT = 33, 17  # odd sizes on purpose
RANKS = (2, 5, 8)  # mixed ranks, padded to 8
FAST = sorted(set(LORA_BACKENDS) - {"reference"})
GRID = list(itertools.product((1, 7, 256), (1, 4, 32), (1, 2, 4)))  # (T, N, K)


def _layer(n: int, seed: int = 0) -> LoRAMixture:
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(D, DOUT)
    adapters = [
        LoRAWeights(
            torch.randn(RANKS[i % 3], D, generator=g) * 0.3,
            torch.randn(DOUT, RANKS[i % 3], generator=g) * 0.3,
            scaling=0.5 + i / 7,
        )
        for i in range(n)
    ]
    return LoRAMixture(base, adapters, backend="reference")


def _route(t: int, n: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct adapters per token where N ≥ K, drawn from the first half only when N > 4."""
    g = torch.Generator().manual_seed(seed)
    pool = max(n // 2, k) if n > 4 else n
    idxs = torch.rand(t, pool, generator=g).topk(min(k, pool), -1).indices  # [T, K]
    if idxs.shape[1] < k:  # N < K: repeats are legal
        idxs = idxs.repeat(1, k)[:, :k]
    gates = torch.softmax(torch.randn(t, k, generator=g), -1)
    return gates, idxs


def _run(
    layer: LoRAMixture, backend: str, x: torch.Tensor, gates: torch.Tensor, idxs: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Forward and backward of one backend; returns the output and every gradient."""
    layer.backend = get_backend(backend)
    params = [layer.a, layer.b_t, layer.base.weight]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    x, gates = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
    y = layer(x, gates, idxs)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
    return y.detach(), [x.grad, gates.grad] + [p.grad for p in params]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(("t", "n", "k"), GRID)
def test_backend_matches_reference_forward_and_backward(backend: str, t: int, n: int, k: int):
    layer = _layer(n)
    x = torch.randn(t, D, generator=torch.Generator().manual_seed(2))
    gates, idxs = _route(t, n, k)
    y_ref, g_ref = _run(layer, "reference", x, gates, idxs)
    y, grads = _run(layer, backend, x, gates, idxs)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, g_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_inference_mode_updates_in_place_and_matches(backend: str):
    layer = _layer(32)
    x = torch.randn(256, D)
    gates, idxs = _route(256, 32, 2)
    with torch.inference_mode():
        y_ref = layer(x, gates, idxs)
        layer.backend = get_backend(backend)
        torch.testing.assert_close(layer(x, gates, idxs), y_ref, rtol=1e-4, atol=1e-5)


def test_reference_is_base_plus_scaled_lora_per_token():
    layer = _layer(4)
    x = torch.randn(3, D)
    idxs = torch.tensor([[2, 0], [1, 1], [3, 2]])
    gates = torch.tensor([[0.7, 0.3], [0.5, 0.5], [1.0, 0.0]])
    want = layer.base(x).detach().clone()
    for t, kk in itertools.product(range(3), range(2)):
        i = int(idxs[t, kk])
        r = RANKS[i % 3]
        a, b = layer.a[i, :r], layer.b[i, :, :r]  # b already carries the scaling
        want[t] += gates[t, kk] * (b @ (a @ x[t]))
    with torch.no_grad():
        torch.testing.assert_close(layer(x, gates, idxs), want, rtol=1e-5, atol=1e-5)


def test_padding_keeps_every_adapter_product():
    adapters = [LoRAWeights(torch.randn(r, D), torch.randn(DOUT, r), 2.0) for r in RANKS]
    a, b, s = stack_adapters(adapters)
    assert a.shape == (3, 8, D) and b.shape == (3, DOUT, 8) and s.tolist() == [2.0] * 3
    for i, w in enumerate(adapters):
        torch.testing.assert_close(b[i] @ a[i], w.b @ w.a)


def test_bad_shapes_and_names_are_refused():
    base = nn.Linear(D, DOUT)
    with pytest.raises(InvalidInput, match="do not fit"):
        LoRAMixture(base, [LoRAWeights(torch.randn(4, D + 1), torch.randn(DOUT, 4), 1.0)])
    with pytest.raises(InvalidInput, match="at least one"):
        LoRAMixture(base, [])
    with pytest.raises(ConfigError, match="grouped"):
        get_backend("fastest")
    layer = _layer(2)
    with pytest.raises(InvalidInput, match="gates"):
        layer(torch.randn(3, D), torch.ones(3, 2), torch.zeros(3, 1, dtype=torch.long))


@pytest.mark.parametrize("backend", FAST)
def test_unaligned_rank_straight_into_a_backend(backend: str):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 5, D, generator=g), torch.randn(6, DOUT, 5, generator=g)  # R = 5
    x, y0 = torch.randn(7, D, generator=g), torch.randn(7, DOUT, generator=g)
    gates, idxs = _route(7, 6, 2)
    want = get_backend("reference").add(y0.clone(), x, a, b, gates, idxs)
    got = get_backend(backend).add(y0.clone(), x, a, b, gates, idxs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("d", "r", "t", "want"),
    [
        (128, 8, 32, "gather"),
        (128, 8, 128, "grouped"),
        (1024, 16, 2, "gather"),
        (1024, 16, 8, "grouped"),
    ],
)
def test_auto_gathers_while_the_copies_are_small(
    monkeypatch: pytest.MonkeyPatch, d: int, r: int, t: int, want: str
) -> None:
    from concilium.experts.moe import lora_backends

    picked = []
    for name in ("gather", "grouped"):
        impl = getattr(lora_backends, f"_{name.upper()}")
        monkeypatch.setattr(impl, "add", _recording(impl.add, picked, name))
    g = torch.Generator().manual_seed(t)
    x, a = torch.randn(t, d, generator=g), torch.randn(4, r, d, generator=g) / d**0.5
    b = torch.randn(4, d, r, generator=g) / r**0.5
    gates, idxs = torch.rand(t, 2, generator=g), torch.randint(0, 4, (t, 2), generator=g)
    got = lora_backends.AutoBackend().add(torch.zeros(t, d), x, a, b, gates, idxs)
    want_y = lora_backends.ReferenceBackend().add(torch.zeros(t, d), x, a, b, gates, idxs)
    assert picked == [want]
    torch.testing.assert_close(got, want_y, atol=1e-4, rtol=1e-4)


def _recording(add, picked: list[str], name: str):  # type: ignore[no-untyped-def]
    def wrapped(*args):  # type: ignore[no-untyped-def]
        picked.append(name)
        return add(*args)

    return wrapped


@pytest.mark.parametrize("backend", sorted(LORA_BACKENDS))
@pytest.mark.parametrize(("t", "k"), [(0, 2), (3, 0)])
@pytest.mark.parametrize("grad", [False, True])
def test_no_tokens_or_no_slots_give_the_base_output(backend: str, t: int, k: int, grad: bool):
    """T = 0 (an empty batch) and K = 0 (a prior with no candidate): y = base(x), no error."""
    layer = _layer(4)
    layer.backend = get_backend(backend)
    x = torch.randn(t, D)
    gates, idxs = torch.rand(t, k), torch.zeros(t, k, dtype=torch.long)
    with torch.set_grad_enabled(grad):
        y = layer(x, gates, idxs)
        want = layer.base(x)
    assert y.shape == (t, DOUT)
    torch.testing.assert_close(y, want)
