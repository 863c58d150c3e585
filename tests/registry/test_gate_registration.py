"""PHATGOOSE gates at registration: trained in the background, stored, nothing else touched."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from concilium.errors import SpecError
from concilium.registry.registry import GateTrainer, Registry
from tests.conftest import HashEncoder


def _spec(pack_dir: Path, name: str, n_examples: int = 8) -> dict[str, Any]:
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    e = next(e for e in manifest["experts"] if e["name"] == name)
    spec = {k: v for k, v in e.items() if k != "default"}
    spec["path"] = str(pack_dir / e["path"])
    spec["train_examples"] = e["train_examples"][:n_examples]
    return spec


def _registry(home: Path, pack_dir: Path, trainer: GateTrainer) -> Registry:
    from concilium.orchestrator.service import arrow_artifacts

    reg = Registry(home, HashEncoder(), adapter_routing=arrow_artifacts, gate_trainer=trainer)
    reg.register({"kind": "model", "name": "demo-moe", "path": str(pack_dir / "base")})
    return reg


def test_registration_returns_before_the_gate_and_the_gate_appears_later(
    tmp_path: Path, pack_dir: Path
):
    started, release = threading.Event(), threading.Event()
    calls: list[tuple[Path, Path, int]] = []

    def slow(base: Path, adapter: Path, examples: list[Any], stop: Any) -> dict[str, np.ndarray]:
        calls.append((base, adapter, len(examples)))
        started.set()
        assert release.wait(30)
        return {"model.layers.0.self_attn.q_proj": np.ones(128, dtype=np.float32)}

    reg = _registry(tmp_path, pack_dir, slow)
    rec = reg.register(_spec(pack_dir, "reverse"))  # returns while the trainer is blocked
    assert started.wait(30) and reg.jobs.pending() == ["reverse"]
    assert "phatgoose" not in reg.get("reverse").artifacts
    assert reg.router_artifact(rec, "phatgoose") is None and reg.router_artifact(rec, "arrow")
    version = reg.version()
    release.set()
    assert reg.wait_for_gates(timeout=30)
    stored = reg.get("reverse")
    assert reg.version() == version + 1  # caches refresh on the bump
    path = reg.router_artifact(stored, "phatgoose")
    assert path is not None and path.parent == reg.artifacts.root and path.suffix == ".safetensors"
    assert calls == [(pack_dir / "base", reg.runtime_path(rec), 8)]
    assert set(reg.token_routing(stored, "phatgoose")) == {"model.layers.0.self_attn.q_proj"}
    assert stored.artifacts["phatgoose"] in {p.name for p in reg.artifacts.root.iterdir()}
    assert reg.gc() == []  # the gate is referenced
    assert reg.train_pending_gates() == []  # nothing left to do


def test_a_new_registration_trains_its_own_gate_and_no_other(tmp_path: Path, pack_dir: Path):
    from concilium.orchestrator.service import phatgoose_gates

    reg = _registry(tmp_path, pack_dir, phatgoose_gates(steps=3))
    for name in ("reverse", "caesar"):
        reg.register(_spec(pack_dir, name))
    reg.register({**_spec(pack_dir, "rotate"), "train_examples": []})  # no data: no gate
    assert reg.wait_for_gates(timeout=120)
    before = {n: reg.get(n).artifacts["phatgoose"] for n in ("reverse", "caesar")}
    tensors = {n: reg.token_routing(reg.get(n), "phatgoose") for n in before}
    for t in tensors.values():
        assert len(t) == 16 and all(v.shape == (128,) for v in t.values())
    assert "phatgoose" not in reg.get("rotate").artifacts

    reg.register(_spec(pack_dir, "uppercase"))
    assert reg.wait_for_gates(timeout=120)
    assert reg.token_routing(reg.get("uppercase"), "phatgoose").keys() == tensors["reverse"].keys()
    for name, ref in before.items():
        assert reg.get(name).artifacts["phatgoose"] == ref
        now = reg.token_routing(reg.get(name), "phatgoose")
        assert all(np.array_equal(now[m], v) for m, v in tensors[name].items())


def test_a_failed_gate_is_recorded_and_not_retried(tmp_path: Path, pack_dir: Path):
    def broken(base: Path, adapter: Path, examples: list[Any], stop: Any) -> dict[str, np.ndarray]:
        raise RuntimeError("out of memory")

    reg = _registry(tmp_path, pack_dir, broken)
    reg.register(_spec(pack_dir, "reverse"))
    assert reg.wait_for_gates(timeout=30)
    art = reg.get("reverse").artifacts
    assert "phatgoose" not in art and "out of memory" in art["phatgoose_error"]
    assert reg.train_pending_gates() == []


def test_a_gate_whose_expert_was_removed_meanwhile_is_dropped(tmp_path: Path, pack_dir: Path):
    release = threading.Event()

    def slow(base: Path, adapter: Path, examples: list[Any], stop: Any) -> dict[str, np.ndarray]:
        assert release.wait(30)
        return {"m": np.zeros(4, dtype=np.float32)}

    reg = _registry(tmp_path, pack_dir, slow)
    reg.register(_spec(pack_dir, "reverse"))
    reg.remove("reverse")
    version = reg.version()
    release.set()
    assert reg.wait_for_gates(timeout=30)
    assert reg.version() == version and [r.name for r in reg.list()] == ["demo-moe"]


def test_pending_gates_resume_in_a_new_process(tmp_path: Path, pack_dir: Path):
    reg = _registry(tmp_path, pack_dir, lambda *a: {})
    reg.gate_trainer = None  # as if the process exited before training
    reg.register(_spec(pack_dir, "reverse"))
    reopened = Registry(tmp_path, HashEncoder(), gate_trainer=lambda *a: {"m": np.ones(2)})
    assert reopened.train_pending_gates() == ["reverse"]
    assert reopened.wait_for_gates(timeout=30)
    assert reopened.token_routing(reopened.get("reverse"), "phatgoose")["m"].tolist() == [1, 1]


def test_malformed_train_examples_are_refused(tmp_path: Path, pack_dir: Path):
    reg = _registry(tmp_path, pack_dir, lambda *a: {})
    with pytest.raises(SpecError, match="train_examples"):
        reg.register({**_spec(pack_dir, "reverse"), "train_examples": [{"prompt": "x"}]})
    assert [r.name for r in reg.list()] == ["demo-moe"]


def test_closing_stops_the_running_gate_and_keeps_it_pending(tmp_path: Path, pack_dir: Path):
    started = threading.Event()

    def endless(base: Path, adapter: Path, examples: list[Any], stop: Any) -> dict[str, np.ndarray]:
        started.set()
        while not stop():  # a real training checks stop() every step
            time.sleep(0.01)
        return {"m": np.ones(2, dtype=np.float32)}

    reg = _registry(tmp_path, pack_dir, endless)
    for name in ("reverse", "caesar"):
        reg.register(_spec(pack_dir, name))
    assert started.wait(30)
    reg.jobs.close(timeout=30)  # what the interpreter's exit does
    assert reg.jobs.pending() == [] and reg.wait_for_gates(timeout=0)
    assert all("phatgoose" not in reg.get(n).artifacts for n in ("reverse", "caesar"))
    later = Registry(tmp_path, HashEncoder(), gate_trainer=lambda *a: {"m": np.ones(2)})
    assert later.train_pending_gates() == ["reverse", "caesar"]
    assert later.wait_for_gates(timeout=30)
    assert all("phatgoose" in later.get(n).artifacts for n in ("reverse", "caesar"))
