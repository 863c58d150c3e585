"""The MoE set-up of an expert replica: our kernels, and optionally expert weight tiering.

    setup = prepare(model, MoEOptions(resident_experts=4), calibration_ids)
    setup.info()    # {"moe_layers": 4, "tier_hit_rate": 0.62, ...} for the replica's info()
    setup.close()   # stop the prefetch thread, drop the tier file

`MoEOptions` is what `deployment.experts.<name>.moe` in the service YAML becomes. With
`resident_experts` set, each MoE layer keeps that many experts in memory and the rest in one
memory-mapped safetensors file in a fresh directory under `store_dir`, removed by `close()`
(ExpertFlow-style, see `tiered.py`; keep it on disk, not tmpfs, or nothing is saved); super experts
(found on `calibration_ids` before the weights leave memory) are pinned when `pin_super_experts`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from concilium.errors import ConfigError

if TYPE_CHECKING:
    from concilium.experts.moe.patching import PatchReport
    from concilium.experts.moe.tiered import TierReport


@dataclass(frozen=True, slots=True)
class MoEOptions:
    """How a replica runs a sparse-MoE base (a dense base ignores all of it)."""

    backend: str | None = "auto"  # MOE_BACKEND_CLS name; None keeps the stock modules
    resident_experts: int | None = None  # per MoE layer; None: every expert stays in memory
    policy: Literal["lru", "lfu"] = "lru"
    prefetch: bool = True  # routing-aware prefetch of the next layer's experts
    background: bool = False  # prefetch on a worker thread (see MoEConfig.background)
    pin_super_experts: bool = True
    super_factor: float = 10.0  # peak / median of peaks that makes an expert "super"
    store_dir: Path | None = None  # the tier file's dir goes here (default: the system temp dir)


@dataclass(slots=True)
class MoESetup:
    """What `prepare` did to the model: the kernel patch or the tiering (or neither)."""

    patch: PatchReport | None = None
    tiers: TierReport | None = None
    pinned: dict[int, set[int]] | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def counters(self) -> dict[str, float]:
        """Monotonic tiering counters (summable over replicas; empty when not tiered)."""
        if self.tiers is None:
            return {}
        s = self.tiers.stats()
        return {
            "tier_hits": s.hits,
            "tier_misses": s.misses,
            "tier_prefetched": s.prefetched,
            "tier_prefetch_used": s.prefetch_used,
            "tier_prefetch_waits": s.waits,
            "tier_bytes_moved": s.bytes_moved,
        }

    def info(self) -> dict[str, float]:
        """For the replica's info(): the counters, MoE layers, hit rate, pinned experts."""
        out = self.counters()
        report = self.tiers or self.patch
        if report is not None:
            out["moe_layers"] = float(len(report.names))
        if self.tiers is not None:
            out["tier_hit_rate"] = self.tiers.stats().hit_rate
            out["tier_pinned"] = float(sum(len(v) for v in (self.pinned or {}).values()))
        return out

    def close(self) -> None:
        if self.tiers is not None:
            self.tiers.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def prepare(model: Any, options: MoEOptions, calibration_ids: Any = None) -> MoESetup:
    """Patch `model`'s supported MoE experts onto our kernels, or tier them (`resident_experts`:
    the tiered layers fetch each expert from the cache and run it themselves), as `options` say.

    `calibration_ids` [1, T] token ids find the super experts to pin (needed when
    `resident_experts` and `pin_super_experts` are set). A model with no supported MoE experts
    module is left alone, unless tiering was asked for: then it is a ConfigError.
    """
    from concilium.experts.moe.patching import experts_sites

    if not experts_sites(model):
        if options.resident_experts is not None:
            raise ConfigError(
                f"moe.resident_experts is set but {type(model).__name__} has no supported "
                "sparse-MoE experts module to tier"
            )
        return MoESetup()
    setup = MoESetup()
    if options.resident_experts is not None:  # tiered layers run their own loop: no patch
        _tier(model, options, calibration_ids, setup)
    elif options.backend is not None:
        from concilium.experts.moe.patching import patch

        setup.patch = patch(model, backend=options.backend)
    return setup


def _tier(model: Any, options: MoEOptions, calibration_ids: Any, setup: MoESetup) -> None:
    import torch

    from concilium.experts.moe.tiered import find_super_experts, tier

    num_experts = _num_experts(model)
    budget = options.resident_experts or 0
    if not 1 <= budget <= num_experts:
        raise ConfigError(
            f"moe.resident_experts {budget}: must be between 1 and the model's {num_experts} "
            "experts per layer"
        )
    if options.pin_super_experts and calibration_ids is not None:
        with torch.no_grad():
            found = find_super_experts(model, calibration_ids, factor=options.super_factor)
        # a layer keeps at least one slot for the experts it routes to
        setup.pinned = {i: set(sorted(es)[: budget - 1]) for i, es in found.items() if es}
    if options.store_dir is not None:
        options.store_dir.mkdir(parents=True, exist_ok=True)
    setup._tmp = tempfile.TemporaryDirectory(prefix="concilium-tier-", dir=options.store_dir)
    setup.tiers = tier(
        model,
        Path(setup._tmp.name) / "experts.safetensors",
        budget,
        policy=options.policy,
        pinned=setup.pinned,
        prefetch=options.prefetch,
        background=options.background,
    )


def _num_experts(model: Any) -> int:
    from concilium.experts.moe.patching import experts_sites

    return int(experts_sites(model, include_ours=True)[0][3].get_parameter("down_proj").shape[0])
