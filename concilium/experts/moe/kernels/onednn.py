"""Prepacked expert weights for CPU inference (oneDNN blocked layout).

On CPU a skinny GEMM (a few tokens against an expert's [2H, D] matrix) through plain `mm` repacks
the weight on every call and runs far below memory bandwidth. Reordering each expert's weights
once into oneDNN's blocked layout makes every later call stream them once: measured here 2-3x
faster than `F.linear` at 2-16 rows, and no slower at 1 or 512 rows.

oneDNN picks its blocking from a batch-size hint, and one layout does not serve every row count:
measured here, a hint of 1 streams a single row ~20% faster than a hint of 16, which in turn is
10-25% faster from 2 rows up. So each expert is packed once per hint (default 1 and 16): a
one-row segment uses the hint-1 pack, every larger one the hint-16 pack. The packs are extra
copies of the expert weights (memory: one per hint; `PackCache(hints=(16,))` keeps one), built
lazily on the first inference call and rebuilt when a weight changes (storage or autograd
version counter). Training (grad mode) never uses them.

Which form is fastest for n rows differs between CPUs (on one host here a 2-row pack was 1.3x
slower than plain `mm`, on another 2-3x faster), so each pack carries a `Form` per row count: the
static rule below by default, or the forms `tuning.Tuner` measured on this machine for this shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

# Measured here (Mixtral expert, fp32, 2 threads, hint-16 packs): one expert's SwiGLU on 2 rows
# takes 1.91 ms, on 3 rows 1.56, on 5 or 6 rows 1.48 -- oneDNN's skinny kernels stream the weights
# best with 5-6 rows -- so 2-4 rows are padded with zero rows to 5 (exact: the padding rows are
# computed and dropped; the weights are read once either way).
MIN_ROWS = 5


class FormTuner(Protocol):
    def forms(
        self, packed: PackedExperts, w13: torch.Tensor, w2: torch.Tensor
    ) -> tuple[Form, ...]: ...


def available() -> bool:
    """True when this torch build has the oneDNN linear ops."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def weights_key(*ws: torch.Tensor) -> tuple[int, ...]:
    """Identity of the weights' current values: storage, version counter and shape."""
    return tuple(v for w in ws for v in (w.data_ptr(), w._version, *w.shape))


@dataclass(frozen=True, slots=True)
class Form:
    """How one expert's SwiGLU runs on n rows: on the pack of hint index `pack`, or on the plain
    weights with `mm` (None); the rows zero-padded to `pad` first when n < pad (exact: the padding
    rows are computed and dropped, the weights are read once either way)."""

    pack: int | None
    pad: int = 0


def static_forms(hints: tuple[int, ...], min_rows: int = MIN_ROWS) -> tuple[Form, ...]:
    """The untuned rule, measured on the first host here: one row on the smallest hint's pack (a
    GEMV), 2..min_rows-1 rows padded to min_rows on the largest, more rows on the largest."""
    last = len(hints) - 1
    return (Form(0), *[Form(last, min_rows)] * (min_rows - 2), Form(last))


@dataclass(frozen=True, slots=True)
class PackedExperts:
    """Per-hint, per-expert oneDNN packs of w13 [E, 2H, D] and w2 [E, D, H], and the form of
    every row count (rows beyond `len(forms)` take the last form)."""

    hints: tuple[int, ...]  # ascending batch-size hints
    w13: tuple[tuple[torch.Tensor, ...], ...]  # [hint][E] opaque [2H, D]
    w2: tuple[tuple[torch.Tensor, ...], ...]  # [hint][E] opaque [D, H]
    key: tuple[int, ...]
    forms: tuple[Form, ...] = ()  # forms[n - 1]: the form of an n-row GEMM

    def form(self, rows: int) -> Form:
        """The form of a `rows`-row GEMM (rows >= 1)."""
        if not self.forms:
            return Form(len(self.hints) - 1)
        return self.forms[min(rows, len(self.forms)) - 1]

    def with_forms(self, forms: tuple[Form, ...]) -> PackedExperts:
        """These packs running `forms`, keeping only the hints some form uses: each pack is a
        full copy of the experts (none is kept when every form is plain `mm`)."""
        used = sorted({f.pack for f in forms if f.pack is not None})
        new = {old: i for i, old in enumerate(used)}
        return PackedExperts(
            hints=tuple(self.hints[i] for i in used),
            w13=tuple(self.w13[i] for i in used),
            w2=tuple(self.w2[i] for i in used),
            key=self.key,
            forms=tuple(Form(None if f.pack is None else new[f.pack], f.pad) for f in forms),
        )


def _reorder(ws: torch.Tensor, hint: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.ops.mkldnn._reorder_linear_weight(w, batch_size=hint) for w in ws)


def pack(w13: torch.Tensor, w2: torch.Tensor, hints: tuple[int, ...] = (1, 16)) -> PackedExperts:
    """Reorder every expert's weights once per hint."""
    hints = tuple(sorted(hints))
    with torch.no_grad():
        a, b = w13.detach(), w2.detach()
        return PackedExperts(
            hints=hints,
            w13=tuple(_reorder(a, h) for h in hints),
            w2=tuple(_reorder(b, h) for h in hints),
            key=weights_key(w13, w2),
            forms=static_forms(hints),
        )


def linear(x: torch.Tensor, packed_w: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ packed_w [out, in].T -> [n, out] (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_w, None, "none", [], "")


class PackCache:
    """Holds one `PackedExperts` for the weights it was last asked about (one per MoE layer).

    With a `tuner` the forms are the ones it measured for this shape on this machine (see
    `tuning.Tuner`); without, the static rule."""

    def __init__(self, hints: tuple[int, ...] = (1, 16), tuner: FormTuner | None = None) -> None:
        self.hints = hints
        self.tuner = tuner
        self._packed: PackedExperts | None = None

    def get(self, w13: torch.Tensor, w2: torch.Tensor) -> PackedExperts | None:
        """The packs of (w13, w2), or None where they cannot be used (not CPU fp32, no oneDNN)."""
        if w13.device.type != "cpu" or w13.dtype != torch.float32 or not available():
            return None
        if self._packed is None or self._packed.key != weights_key(w13, w2):
            self._packed = None  # drop the old packs before building new ones
            packed = pack(w13, w2, self.hints)
            if self.tuner is not None:
                packed = packed.with_forms(self.tuner.forms(packed, w13, w2))
            self._packed = packed
        return self._packed

    def clear(self) -> None:
        self._packed = None
