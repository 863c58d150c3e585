"""Expert weight tiering: half the experts resident, same outputs; cache policy; super experts."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from concilium.errors import ConfigError
from concilium.experts.moe.tiered import TieredExperts, find_super_experts, tier
from concilium.experts.moe.tiering import ExpertCache, ExpertStore, write_store
from tests.experts.moe.test_patch import demo_base, prompt, tiny


def test_demo_base_with_half_the_experts_resident_gives_the_same_outputs(tmp_path: Path) -> None:
    model = demo_base()
    ids = prompt(model.config.vocab_size, t=16)
    with torch.no_grad():
        want = model(ids).logits
        want_gen = model.generate(ids, max_new_tokens=24, do_sample=False)
        report = tier(model, tmp_path / "experts.safetensors", budget=4)
        got = model(ids).logits
        got_gen = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert len(report.caches) == 4 and all(
        isinstance(model.get_submodule(n), TieredExperts) for n in report.names
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(got_gen, want_gen)
    stats = report.stats()
    assert stats.misses > 0 and stats.bytes_moved > 0 and 0 < stats.hit_rate < 1
    assert stats.prefetched > 0
    assert all(len(c.resident) <= 4 for c in report.caches)
    assert not any("experts.gate_up_proj" in k for k in model.state_dict())  # weights left RAM


def test_prefetch_changes_nothing_but_the_counters(tmp_path: Path) -> None:
    outs = []
    for prefetch, background in ((True, False), (True, True), (False, False)):
        model = tiny("mixtral")
        ids = prompt(model.config.vocab_size)
        path = tmp_path / f"{prefetch}-{background}.safetensors"
        report = tier(model, path, budget=3, prefetch=prefetch, background=background)
        assert (report.loader is not None) == background
        with torch.no_grad():
            outs.append(model.generate(ids, max_new_tokens=12, do_sample=False))
        report.close()
        assert (report.stats().prefetched > 0) == prefetch
        assert all(len(c.resident) <= 3 for c in report.caches)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


class SlowStore(ExpertStore):
    """Loads wait for `gate`, so a test sees them in flight."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()

    def load(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.gate.wait(10)
        return super().load(layer, expert)


def test_background_prefetch_stays_in_budget_and_hands_over_the_weights(tmp_path: Path) -> None:
    store_with(tmp_path)
    store = SlowStore(tmp_path / "s.safetensors")
    with ThreadPoolExecutor(1) as loader:
        cache = ExpertCache(store, 0, budget=2, loader=loader)
        cache.prefetch([3, 4])  # both in flight: the budget is spent
        assert cache.resident == [] and cache.stats.prefetched == 2
        # the load of 3 opens only once get(3) waits on it: get saw it in flight, whatever the
        # scheduling (a timer opening the gate could fire before get(3) is called)
        pending = cache._pending[3]
        assert not pending.done()
        wait_for_load = pending.result

        def result(timeout: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            store.gate.set()
            return wait_for_load(timeout)

        pending.result = result  # type: ignore[method-assign]
        w13, _ = cache.get(3)  # waits for its load
        assert store.gate.is_set()
        assert (w13 == 3).all() and cache.stats.waits == 1 and cache.stats.prefetch_used == 1
        cache.get(5)  # a miss with the other slot still a load: takes it, then evicts
        assert len(cache.resident) <= 2 and 5 in cache.resident and 3 not in cache.resident
        cache.close()  # 4's background load (done or not yet) is handed over: still in budget
        assert cache.resident == [4, 5]
        assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def store_with(tmp_path: Path, e: int = 6) -> ExpertStore:
    w13 = torch.arange(e, dtype=torch.float32).view(e, 1, 1).expand(e, 4, 3).contiguous()
    write_store(tmp_path / "s.safetensors", [(w13, torch.zeros(e, 3, 2))])
    return ExpertStore(tmp_path / "s.safetensors")


def test_store_round_trip(tmp_path: Path) -> None:
    w13, w2 = store_with(tmp_path).load(0, 5)
    assert w13.shape == (4, 3) and w2.shape == (3, 2) and (w13 == 5).all()


def test_lru_evicts_the_least_recent_and_counts(tmp_path: Path) -> None:
    cache = ExpertCache(store_with(tmp_path), 0, budget=2, policy="lru")
    for e in (0, 1, 0, 2):  # 1 is least recent when 2 arrives
        cache.get(e)
    assert cache.resident == [0, 2]
    assert (cache.stats.hits, cache.stats.misses) == (1, 3)
    assert cache.stats.bytes_moved == 3 * (4 * 3 + 3 * 2) * 4


def test_lfu_keeps_the_frequent_and_pinned_never_leave(tmp_path: Path) -> None:
    cache = ExpertCache(store_with(tmp_path), 0, budget=3, policy="lfu", pinned=frozenset({5}))
    for e in (0, 0, 0, 1, 2, 3, 4):
        cache.get(e)
    assert 0 in cache.resident and 5 in cache.resident and len(cache.resident) == 3
    cache.prefetch([1, 2, 3])
    assert 5 in cache.resident
    with pytest.raises(ConfigError, match="pinned"):
        ExpertCache(store_with(tmp_path), 0, budget=1, pinned=frozenset({1}))


def test_prefetch_hits_are_counted(tmp_path: Path) -> None:
    cache = ExpertCache(store_with(tmp_path), 0, budget=2)
    cache.prefetch([3, 4])
    cache.get(3)
    assert (cache.stats.prefetched, cache.stats.prefetch_used, cache.stats.misses) == (2, 1, 0)


def test_super_experts_are_found_and_stay_resident(tmp_path: Path) -> None:
    model = tiny("mixtral")
    ids = prompt(model.config.vocab_size, t=24)
    with torch.no_grad():  # make expert 3 of layer 1 a super expert: huge down-projection
        model.model.layers[1].mlp.experts.down_proj[3].mul_(100.0)
    supers = find_super_experts(model, ids)
    assert supers[1] == {3} and supers[0] == set()
    report = tier(model, tmp_path / "s.safetensors", budget=2, pinned=supers)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, do_sample=False)
    assert 3 in report.caches[1].resident


def _mapped(path: Path) -> bool:
    """True while this process has `path` memory-mapped (Linux /proc)."""
    return any(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_close_unmaps_the_tier_file_and_resident_weights_survive(tmp_path: Path) -> None:
    """Loads copy out of the mapping (the resident experts hold no view of the file), and closing
    the report releases the file even while the model is still alive."""
    from concilium.experts.moe.replica import MoEOptions, prepare

    model = tiny("mixtral")
    ids = prompt(model.config.vocab_size)
    stock = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()  # [E, 2H, D]
    setup = prepare(model, MoEOptions(resident_experts=3, store_dir=tmp_path), ids)
    assert setup.tiers is not None
    with torch.no_grad():
        model(ids)
    cache = setup.tiers.caches[0]
    path = cache.store.path
    assert _mapped(path)
    setup.close()
    assert not _mapped(path) and not path.exists()
    e = cache.resident[0]
    torch.testing.assert_close(cache.get(e)[0], stock[e], rtol=0, atol=0)  # a hit: no file


def test_prefetch_of_a_generator_never_evicts_its_own_picks(tmp_path: Path) -> None:
    """`experts` may be any iterable: the predicted experts protect each other either way."""
    got = []
    for picks in ([3, 4], iter([3, 4])):
        cache = ExpertCache(store_with(tmp_path), 0, budget=2, policy="lfu")
        cache.get(1)
        cache.get(2)
        cache.prefetch(picks)
        got.append(cache.resident)
    assert got == [[3, 4], [3, 4]]
