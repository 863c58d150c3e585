"""Fixtures of the adapter-validation fuzz tests: the tiny base, its adapter config, a scratch dir,
and a spy that refuses (and records) every way to unpickle for each whole module."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from concilium.registry.registry import Registry
from concilium.registry.validate import (
    ModelInfo,
    validate_model_dir,
)
from tests.registry.conftest import TinyMoe, refuse_unpickling, tiny_registry
from tests.registry.fuzz.common import CFG


@pytest.fixture(scope="module")
def base(tiny_moe: TinyMoe) -> ModelInfo:
    return validate_model_dir(tiny_moe.base_dir)


@pytest.fixture(scope="module")
def good_config(tiny_moe: TinyMoe) -> dict[str, Any]:
    return dict(json.loads((tiny_moe.lora_dir / CFG).read_text()))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def unpickling(base: ModelInfo) -> Iterator[list[str]]:
    """Every way to unpickle, replaced for this whole module by a recorder that also refuses.

    Module-scoped so it holds across hypothesis examples; `base` first, so the session's tiny
    model is built before the patch."""
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        refuse_unpickling(mp, calls)
        yield calls


@pytest.fixture(autouse=True)
def never_unpickled(unpickling: list[str]) -> Iterator[None]:
    yield
    assert unpickling == []


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_moe: TinyMoe) -> Registry:
    """A registry with the tiny base, built the way test_register_files.py builds one."""
    return tiny_registry(tmp_path_factory.mktemp("fuzz-home"), tiny_moe)


@pytest.fixture
def adapter(tiny_moe: TinyMoe, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_moe.lora_dir, tmp_path / "adapter"))
