"""The measured kernel forms: choice, exactness of every form, sharing, and the packs kept."""

from __future__ import annotations

import pytest
import torch

from concilium.errors import ConfigError
from concilium.experts.moe.kernels import dispatch, onednn, tuning
from concilium.experts.moe.kernels.onednn import Form, PackCache, static_forms
from concilium.experts.moe.kernels.tuning import Tuner, candidates, choose, describe
from concilium.experts.moe.layer import SparseMoE, get_backend
from concilium.experts.moe.reference import reference_moe, swiglu

pytestmark = pytest.mark.skipif(not onednn.available(), reason="no oneDNN in this torch build")

E, D, H = 3, 64, 48


def weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * H, D, generator=g) / D**0.5, torch.randn(E, D, H, generator=g) / 7


def test_choose_takes_the_fastest_form_and_fills_the_gaps() -> None:
    w13, w2 = weights()
    packed = onednn.pack(w13, w2, (1, 16))
    # plain mm wins at 2 rows, the padded large pack at 3, the hint-1 pack everywhere else
    fast = {2: Form(None), 3: Form(1, onednn.MIN_ROWS)}
    forms = choose(packed, lambda f, n: float(f != fast.get(n, Form(0))), rows=(1, 2, 3, 8))
    assert len(forms) == 8
    assert forms[0] == Form(0) and forms[1] == Form(None)
    assert forms[2:7] == (Form(1, onednn.MIN_ROWS),) * 5  # 4..7 rows: the choice at 3
    assert forms[7] == Form(0)
    assert packed.with_forms(forms).form(500) == Form(0)  # beyond: the last form
    assert describe(packed, forms) == "1: pack1, 2: mm, 3-7: pack16 pad 5, 8+: pack1"


def test_candidates_pad_only_below_the_padded_row_count() -> None:
    packed = onednn.pack(*weights(), (1, 16))
    assert Form(1, onednn.MIN_ROWS) in candidates(packed, 2)
    assert all(f.pad == 0 for f in candidates(packed, 1) + candidates(packed, onednn.MIN_ROWS))
    assert {Form(None), Form(0), Form(1)} <= set(candidates(packed, 9))


@pytest.mark.parametrize("form", [Form(None), Form(0), Form(1), Form(1, onednn.MIN_ROWS)])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 7])
def test_every_form_is_exact(form: Form, rows: int) -> None:
    w13, w2 = weights(1)
    packed = onednn.pack(w13, w2, (1, 16)).with_forms((form,))
    x = torch.randn(rows, D, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        got = dispatch.expert_swiglu(x, 2, w13, w2, packed)
    torch.testing.assert_close(got, swiglu(x, w13[2], w2[2]), atol=1e-5, rtol=1e-4)


def test_with_forms_keeps_only_the_packs_it_uses() -> None:
    packed = onednn.pack(*weights(), (1, 16))
    only16 = packed.with_forms((Form(1), Form(None)))
    assert only16.hints == (16,) and only16.forms == (Form(0), Form(None))
    assert only16.w13[0][0] is packed.w13[1][0]  # the same pack, not a copy
    assert packed.with_forms((Form(None),)).hints == ()  # all plain mm: no pack kept


def test_static_forms_are_the_untuned_rule() -> None:
    packed = onednn.pack(*weights(), (1, 16))
    assert packed.forms == static_forms((1, 16))
    pad = onednn.MIN_ROWS
    assert [packed.form(n) for n in (1, 2, pad - 1, pad, 300)] == [
        Form(0),
        Form(1, pad),
        Form(1, pad),
        Form(1),
        Form(1),
    ]


def test_a_shared_tuner_measures_each_shape_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = tuning.choose

    def counting(packed, measure, rows=tuning.ROWS):  # type: ignore[no-untyped-def]
        calls.append(tuple(rows))
        return real(packed, measure, rows)

    monkeypatch.setattr(tuning, "choose", counting)
    tuner = Tuner(rows=(1, 2), passes=1)
    a, b = PackCache(tuner=tuner), PackCache(tuner=tuner)
    w13, w2 = weights(2)
    pa, pb = a.get(w13, w2), b.get(*weights(3))  # two layers of one shape
    assert pa is not None and pb is not None and len(calls) == 1
    assert pa.forms == pb.forms and len(pa.forms) == 2
    PackCache(tuner=tuner).get(torch.randn(E, 2 * H, 32), torch.randn(E, 32, H))  # another shape
    assert len(calls) == 2


def test_auto_tunes_and_named_backends_keep_the_static_rule() -> None:
    assert isinstance(get_backend("auto").packs.tuner, Tuner)
    assert get_backend("decode").packs.tuner is None
    assert get_backend("grouped").packs.tuner is None
    shared = Tuner()
    assert get_backend("auto", shared).packs.tuner is shared


@pytest.mark.parametrize("t", [1, 2, 3, 5, 17, 70])
def test_tuned_auto_backend_matches_reference(t: int) -> None:
    """Experts over AutoBackend's small size, so the packed (tuned) paths run."""
    moe = SparseMoE(8, 256, 512, backend="auto")
    g = torch.Generator().manual_seed(t)
    x, w = torch.randn(t, 256, generator=g), torch.rand(t, 2, generator=g)
    idxs = torch.randint(0, 8, (t, 2), generator=g)
    with torch.no_grad():
        got = moe(x, w, idxs)
        want = reference_moe(x, moe.w13, moe.w2, w, idxs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    packed = moe.backend.packs.get(moe.w13, moe.w2)
    assert packed is not None and len(packed.forms) == max(tuning.ROWS)


@pytest.mark.parametrize(("rows", "passes"), [((), 2), ((0, 4), 2), ((1,), 0)])
def test_a_tuner_without_row_counts_or_passes_is_refused(
    rows: tuple[int, ...], passes: int
) -> None:
    with pytest.raises(ConfigError, match="row counts"):
        Tuner(rows=rows, passes=passes)


def test_caches_with_other_hints_never_share_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    """A form names its pack by index among the hints: forms measured on (1, 16) packs name
    pack 1, which (16,) packs do not have."""

    def largest_pack(packed, w13, w2, passes=2):  # type: ignore[no-untyped-def]
        return lambda f, n: 1.0 if f.pack is None else -float(f.pack)  # the last pack wins

    monkeypatch.setattr(tuning, "timer", largest_pack)
    tuner = Tuner(rows=(1,), passes=1)
    w13, w2 = weights(4)
    two = PackCache(hints=(1, 16), tuner=tuner).get(w13, w2)
    one = PackCache(hints=(16,), tuner=tuner).get(w13, w2)
    assert two is not None and two.hints == (16,) and two.forms == (Form(0),)
    assert one is not None and one.hints == (16,) and one.forms == (Form(0),)
