"""`build_pack(quick=True)`: the full on-disk layout, valid specs, loadable model and adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from concilium.pack.build import build_pack
from concilium.pack.manifest import HELDOUT, expert_specs, load_heldout, load_manifest
from concilium.pack.tasks import NON_DEFAULT, SKILLS
from concilium.registry.specs import LoraSpec, ModelSpec, parse_spec

BASE_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
}


@pytest.fixture(scope="module")
def quick_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quick") / "pack"
    out.mkdir()
    (out / "stale.txt").write_text("replaced by the build")
    messages: list[str] = []
    assert build_pack(out, seed=3, quick=True, progress=messages.append) == out
    assert any("adapter" in m for m in messages)
    return out


def test_layout(quick_pack: Path) -> None:
    assert not (quick_pack / "stale.txt").exists()
    assert not quick_pack.with_name("pack.tmp").exists()
    assert {p.name for p in (quick_pack / "base").iterdir()} >= BASE_FILES
    for s in SKILLS:
        files = {p.name for p in (quick_pack / "adapters" / s.name).iterdir()}
        assert files == {
            "adapter_config.json",
            "adapter_model.safetensors",
            "README.md",
        } or files == {
            "adapter_config.json",
            "adapter_model.safetensors",
        }
    assert not list(quick_pack.rglob("*.bin"))
    report = (quick_pack / "REPORT.md").read_text()
    assert "| skill | base exact-match | adapter exact-match" in report
    assert all(f"| {s.name} |" in report for s in SKILLS)


def test_manifest_specs_validate(quick_pack: Path) -> None:
    doc = load_manifest(quick_pack)
    assert doc["version"] == 1 and doc["seed"] == 3 and doc["report"]["quick"] is True
    specs = [parse_spec(d) for d in expert_specs(quick_pack)]
    assert isinstance(specs[0], ModelSpec) and specs[0].name == "demo-moe"
    loras = [s for s in specs if isinstance(s, LoraSpec)]
    assert [s.name for s in loras] == [s.name for s in SKILLS]
    assert {e["name"] for e in doc["experts"] if not e["default"]} == NON_DEFAULT
    defaults = expert_specs(quick_pack, defaults_only=True)
    assert len(defaults) == 1 + len(SKILLS) - len(NON_DEFAULT)
    for spec in loras:
        assert (quick_pack / spec.path / "adapter_model.safetensors").is_file()
        assert spec.base == "demo-moe" and len(spec.categories) == 1
        assert 8 <= len(spec.examples) <= 16 and 32 <= len(spec.train_examples) <= 64
        assert spec.params_total > specs[0].params_total > specs[0].params_active  # type: ignore[operator]


def test_heldout_file(quick_pack: Path) -> None:
    rows = load_heldout(quick_pack)
    doc = load_manifest(quick_pack)
    for e in doc["experts"]:
        mine = [r for r in rows if r["skill"] == e["name"]]
        assert len(mine) >= 50
        assert not {r["query"] for r in mine} & set(e["examples"])


def test_quick_build_loads_with_plain_transformers_and_peft(quick_pack: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(quick_pack / "base"))
    model = AutoModelForCausalLM.from_pretrained(str(quick_pack / "base"))
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    peft = PeftModel.from_pretrained(model, str(quick_pack / "adapters" / "reverse"))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Reverse this word: abc"}], add_generation_prompt=True
    )
    out = peft.generate(**_as_batch(ids), max_new_tokens=3, do_sample=False)
    prompt = _input_ids(ids)
    assert out[0, : len(prompt)].tolist() == prompt  # the prompt, then what it generated
    assert len(prompt) < out.shape[1] <= len(prompt) + 3  # at least one new token
    cfg = json.loads((quick_pack / "adapters" / "reverse" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8


def _input_ids(enc: object) -> list[int]:
    return list(enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc)  # type: ignore[index, call-overload]


def _as_batch(enc: object) -> dict[str, object]:
    import torch

    return {"input_ids": torch.tensor([_input_ids(enc)])}


def test_quick_pack_passes_the_registry_checks(quick_pack: Path) -> None:
    from concilium.registry.validate import validate_adapter_dir, validate_model_dir

    base = validate_model_dir(quick_pack / "base")
    assert base.model_type == "qwen2_moe"
    for s in SKILLS:
        info = validate_adapter_dir(quick_pack / "adapters" / s.name, base)
        assert info.rank == 8 and info.target_modules


def test_build_is_deterministic_from_the_seed(quick_pack: Path, tmp_path: Path) -> None:
    again = build_pack(tmp_path / "again", seed=3, quick=True)
    files = ["base/model.safetensors", "adapters/reverse/adapter_model.safetensors", HELDOUT]
    for rel in files:
        assert (again / rel).read_bytes() == (quick_pack / rel).read_bytes(), rel
