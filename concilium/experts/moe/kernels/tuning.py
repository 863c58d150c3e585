"""Measure, once per layer shape on this machine, which form runs an expert's SwiGLU fastest for
each small row count (plain `mm`, a oneDNN pack of some batch-size hint, a pack with zero-row
padding), like a BLAS autotuner: the winner differs between CPUs.

    tuner = Tuner()                       # share one across the layers of a model
    packs = PackCache(tuner=tuner)        # the packs' forms are then the measured ones

Each candidate is timed over every expert of the layer in turn (a layer larger than the
last-level cache is then read cold, as decoding reads it), the best of `passes` passes kept. Row
counts between the measured ones take the form of the nearest measured count below (those below
the smallest, its form), larger ones the form of the largest.
Results are kept per (w13 shape, w2 shape, dtype, pack hints, intra-op threads): a form names its
pack by index among the hints, so caches with other hints never share forms. All layers of one
shape pay for one measurement (1.5-2 s for a Mixtral-size layer here, at the first inference call).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch

from concilium.errors import ConfigError
from concilium.experts.moe.kernels import dispatch
from concilium.experts.moe.kernels.onednn import MIN_ROWS, Form, PackedExperts

log = logging.getLogger(__name__)

ROWS: tuple[int, ...] = (1, 2, 3, 4, 8, 16, 64)  # measured; beyond 64: the form of 64

Measure = Callable[[Form, int], float]  # (form, rows) -> seconds


def candidates(packed: PackedExperts, rows: int) -> list[Form]:
    """Every form worth timing for `rows` rows."""
    out = [Form(None), *[Form(i) for i in range(len(packed.hints))]]
    if 1 < rows < MIN_ROWS:
        out.append(Form(len(packed.hints) - 1, MIN_ROWS))
    return out


def choose(packed: PackedExperts, measure: Measure, rows: Sequence[int] = ROWS) -> tuple[Form, ...]:
    """forms[n - 1] for n = 1 .. max(rows): the fastest candidate at each measured n, the choice of
    the nearest measured n below for the rest (of the smallest for n below it)."""
    best: dict[int, Form] = {}
    for n in sorted(rows):
        times = {f: measure(f, n) for f in candidates(packed, n)}
        best[n] = min(times, key=lambda f: times[f])
    forms, current = [], best[min(best)]
    for n in range(1, max(best) + 1):
        current = best.get(n, current)
        forms.append(current)
    return tuple(forms)


def timer(packed: PackedExperts, w13: torch.Tensor, w2: torch.Tensor, passes: int = 2) -> Measure:
    """The real `Measure`: the best of `passes` passes over all E experts (no autograd)."""

    def measure(form: Form, rows: int) -> float:
        x = torch.randn(rows, w13.shape[2], generator=torch.Generator().manual_seed(rows))
        one = packed.with_forms((form,) * rows)  # this form for these rows, the same packs
        best = float("inf")
        with torch.no_grad():
            for _ in range(passes):
                t0 = time.perf_counter()
                for e in range(w13.shape[0]):
                    dispatch.expert_swiglu(x, e, w13, w2, one)
                best = min(best, time.perf_counter() - t0)
        return best

    return measure


class Tuner:
    """Measured forms per layer shape (thread-safe; one measurement per shape)."""

    def __init__(self, rows: Sequence[int] = ROWS, passes: int = 2) -> None:
        if not rows or min(rows) < 1 or passes < 1:
            raise ConfigError(f"tuning needs row counts >= 1 and passes >= 1; got {rows}, {passes}")
        self.rows = tuple(rows)
        self.passes = passes
        self._forms: dict[tuple[object, ...], tuple[Form, ...]] = {}
        self._lock = threading.Lock()

    def forms(self, packed: PackedExperts, w13: torch.Tensor, w2: torch.Tensor) -> tuple[Form, ...]:
        key = (tuple(w13.shape), tuple(w2.shape), w13.dtype, packed.hints, torch.get_num_threads())
        with self._lock:
            if key not in self._forms:
                t0 = time.perf_counter()
                forms = choose(packed, timer(packed, w13, w2, self.passes), self.rows)
                self._forms[key] = forms
                took = time.perf_counter() - t0
                log.info(
                    "MoE kernel forms for %s (%.2f s): %s", key[:2], took, describe(packed, forms)
                )
            return self._forms[key]

    def __deepcopy__(self, memo: dict[int, object]) -> Tuner:
        """A copied model shares its original's measurements (they depend on the machine)."""
        return self

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}  # a lock does not pickle

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def describe(packed: PackedExperts, forms: Sequence[Form]) -> str:
    """'1: pack16, 2-3: mm, 4+: pack16 pad 5'-style summary of forms (hints of `packed`)."""

    def name(f: Form) -> str:
        base = "mm" if f.pack is None else f"pack{packed.hints[f.pack]}"
        return f"{base} pad {f.pad}" if f.pad else base

    runs: list[tuple[int, int, Form]] = []
    for n, f in enumerate(forms, start=1):
        if runs and runs[-1][2] == f:
            runs[-1] = (runs[-1][0], n, f)
        else:
            runs.append((n, n, f))
    parts = [f"{a}-{b}" if a != b else f"{a}" for a, b, _ in runs]
    parts[-1] = f"{runs[-1][0]}+"
    return ", ".join(f"{p}: {name(f)}" for p, (_, _, f) in zip(parts, runs, strict=True))
