"""Registration-time validation: nothing reaches the store, or a loader, before it passes here.

A registry that accepts anything is a remote-code-execution hole, so every check runs before any
tensor is loaded, and nothing here ever unpickles: weights are read only as safetensors, whose
header is checked by hand first (``safetensors_check``).

``validate_model_dir``    a local Hugging Face model directory (causal LM or sentence-transformer)
``validate_adapter_dir``  a PEFT LoRA adapter directory, against the `ModelInfo` of its base
``validate_remote_url``   the base URL of a remote OpenAI-compatible expert (from ``urls``)

The directory walk and link / file-type rules live in ``fs_checks``, the strict adapter_config.json
model in ``peft_config``; this module composes them and checks tensors against the base model.

Decisions worth knowing:

* Adapter directories may contain no symlink at all. Model directories may contain symlinks (a
  Hugging Face cache snapshot is made of them) whose targets resolve to regular files inside
  `allowed_root`, or inside the model directory itself when no root is given.
* Pickle-based files (.bin .pt .pth .pkl .pickle .ckpt .joblib .npy .npz) and code files (.py .pyc
  .so) anywhere in either directory reject it, even beside a good safetensors file.
* Adapter tensors may be F32/F16/BF16 only; model weights may also hold integer/bool buffers.
* Every name in either directory must be UTF-8: rejections name files and are sent as UTF-8.
* `total_bytes` is the size of every regular file in the directory: what the size cap applies to.
* A remote host name that does not resolve at registration is accepted (the endpoint may come up
  later); one that resolves to a forbidden address is refused. Resolution can be changed after
  registration (DNS rebinding), so the HTTP client should check the address it connects to as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from concilium.errors import AdapterRejected
from concilium.registry.fs_checks import (
    Entry,
    check_dir,
    json_object,
    load_json,
    refuse_links,
    refuse_unsafe_files,
    resolve_links,
    shown,
    total_bytes,
    walk,
)
from concilium.registry.peft_config import (
    ADAPTER_CONFIG,
    LoraAdapterConfig,
    LoraPlan,
    parse_config,
)
from concilium.registry.safetensors_check import (
    ADAPTER_DTYPES,
    MODEL_DTYPES,
    TensorInfo,
    parse_safetensors_bytes,
    read_bytes,
    read_header_as,
    read_safetensors_header,
)
from concilium.registry.urls import validate_remote_url

__all__ = [
    "AdapterInfo",
    "LoraAdapterConfig",
    "ModelInfo",
    "TensorInfo",
    "read_safetensors_header",
    "validate_adapter_dir",
    "validate_model_dir",
    "validate_remote_url",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code")
PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What registration learned about a model directory."""

    path: Path
    model_type: str
    architectures: tuple[str, ...]
    linear_shapes: dict[str, tuple[int, int]]  # module path -> (out, in), every 2-D "<m>.weight"
    num_params: int
    hidden_size: int | None
    total_bytes: int


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """What registration learned about a LoRA adapter directory."""

    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    modules: tuple[str, ...]  # base module paths the adapter changes
    num_params: int
    total_bytes: int
    files: tuple[str, ...]  # names, relative to `path`, of the files that make up the adapter


# ----------------------------------------------------------------------------- model dirs


def validate_model_dir(
    path: Path, *, max_bytes: int = 2 * 1024**3, allowed_root: Path | None = None
) -> ModelInfo:
    """Check a Hugging Face model directory (config.json + *.safetensors); never loads weights."""
    root = check_dir(path, allowed_root, "model")
    entries = walk(root)
    refuse_unsafe_files(entries)
    entries = resolve_links(entries, allowed_root.resolve() if allowed_root else root)
    total = total_bytes(path, entries, max_bytes)
    by_rel = {e.rel: e for e in entries}
    config = _model_config(by_rel, path)
    _check_st_modules(by_rel)
    tensors = _model_tensors(entries, path, max_bytes)
    return ModelInfo(
        path=root,
        model_type=config["model_type"],
        architectures=tuple(config.get("architectures") or ()),
        linear_shapes={
            name.removesuffix(".weight"): (t.shape[0], t.shape[1])
            for name, t in tensors.items()
            if name.endswith(".weight") and len(t.shape) == 2
        },
        num_params=sum(t.numel for t in tensors.values()),
        hidden_size=_hidden_size(config),
        total_bytes=total,
    )


def _model_config(by_rel: dict[str, Entry], path: Path) -> dict[str, Any]:
    if "config.json" not in by_rel:
        raise AdapterRejected(f"{shown(path)}: missing config.json")
    config = json_object(by_rel["config.json"])
    _refuse_remote_code("config.json", config)
    if "tokenizer_config.json" in by_rel:
        _refuse_remote_code("tokenizer_config.json", load_json(by_rel["tokenizer_config.json"]))
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise AdapterRejected(
            f"config.json: model_type must be a non-empty string, got {model_type!r}"
        )
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise AdapterRejected(
            f"config.json: architectures must be a list of strings, got {archs!r}"
        )
    return config


def _refuse_remote_code(label: str, obj: Any) -> None:
    for key in REMOTE_CODE_KEYS:
        if isinstance(obj, dict) and key in obj:
            raise AdapterRejected(
                f"{label}: key {key!r} is not allowed (it makes transformers run shipped code)"
            )


def _check_st_modules(by_rel: dict[str, Entry]) -> None:
    """A sentence-transformer's modules.json may only name sentence_transformers classes."""
    if "modules.json" not in by_rel:
        return
    modules = load_json(by_rel["modules.json"])
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise AdapterRejected("modules.json: must be a JSON list of objects")
    for m in modules:
        kind, sub = m.get("type"), m.get("path", "")
        if not isinstance(kind, str) or not kind.startswith("sentence_transformers."):
            raise AdapterRejected(
                f"modules.json: type {kind!r} is not a sentence_transformers class"
            )
        if not isinstance(sub, str) or sub.startswith("/") or ".." in PurePosixPath(sub).parts:
            raise AdapterRejected(f"modules.json: path {sub!r} leaves the model directory")


def _model_tensors(entries: list[Entry], path: Path, max_bytes: int) -> dict[str, TensorInfo]:
    """Headers of every *.safetensors file; the top-level ones are the model's weights."""
    tensors: dict[str, TensorInfo] = {}
    weights = [e for e in entries if e.rel.endswith(".safetensors")]
    for e in weights:
        header = read_header_as(e.path, e.rel, max_bytes=max_bytes, allowed_dtypes=MODEL_DTYPES)
        if "/" in e.rel:
            continue
        if dup := tensors.keys() & header.keys():
            raise AdapterRejected(f"{e.rel}: tensor {min(dup)!r} also appears in another file")
        tensors.update(header)
    if not tensors:
        raise AdapterRejected(f"{shown(path)}: no *.safetensors weights at the top level")
    return tensors


def _hidden_size(config: dict[str, Any]) -> int | None:
    for c in (config, config.get("text_config")):
        v = c.get("hidden_size") if isinstance(c, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


# ----------------------------------------------------------------------------- adapter dirs


def validate_adapter_dir(
    path: Path,
    base: ModelInfo,
    *,
    max_rank: int = 64,
    max_bytes: int = 256 * 1024**2,
    allowed_root: Path | None = None,
) -> AdapterInfo:
    """Check a PEFT LoRA adapter directory against its base; loads tensors only as safetensors."""
    root = check_dir(path, allowed_root, "adapter")
    entries = walk(root)
    refuse_links(entries, root)
    refuse_unsafe_files(entries)
    by_rel = {e.rel: e for e in entries}
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if name not in by_rel:
            raise AdapterRejected(
                f"{shown(path)}: missing {name} "
                f"(a LoRA adapter is {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
            )
    total = total_bytes(path, entries, max_bytes)
    plan = parse_config(load_json(by_rel[ADAPTER_CONFIG]), base, max_rank)
    data = read_bytes(by_rel[ADAPTER_WEIGHTS].path, ADAPTER_WEIGHTS, max_bytes=max_bytes)
    header = parse_safetensors_bytes(ADAPTER_WEIGHTS, data, ADAPTER_DTYPES)
    modules = _check_lora_tensors(header, plan, base)
    _check_finite(ADAPTER_WEIGHTS, data)
    return AdapterInfo(
        path=root,
        rank=plan.rank,
        alpha=plan.alpha,
        target_modules=tuple(sorted(plan.targets)),
        modules=modules,
        num_params=sum(t.numel for t in header.values()),
        total_bytes=total,
        files=(ADAPTER_CONFIG, ADAPTER_WEIGHTS),
    )


def _split_lora_key(key: str) -> tuple[str, str]:
    """`base_model.model.<module>.lora_A.weight` -> (<module>, "A")."""
    for suffix, part in _LORA_SUFFIXES.items():
        if key.startswith(PEFT_PREFIX) and key.endswith(suffix):
            module = key[len(PEFT_PREFIX) : -len(suffix)]
            if module:
                return module, part
    raise AdapterRejected(
        f"{ADAPTER_WEIGHTS}: unexpected tensor {key!r}; only "
        f"{PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight are allowed"
    )


def _check_lora_tensors(
    header: dict[str, TensorInfo], plan: LoraPlan, base: ModelInfo
) -> tuple[str, ...]:
    """Every tensor is half of an A/B pair on a targeted base linear, with matching shapes."""
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for key, info in header.items():
        module, part = _split_lora_key(key)
        pairs.setdefault(module, {})[part] = info
    if not pairs:
        raise AdapterRejected(f"{ADAPTER_WEIGHTS}: contains no LoRA tensors")
    for module, parts in pairs.items():
        _check_module(module, parts, plan, base)
    return tuple(sorted(pairs))


def _check_module(
    module: str, parts: dict[str, TensorInfo], plan: LoraPlan, base: ModelInfo
) -> None:
    where = f"{ADAPTER_WEIGHTS}: module {module!r}"
    if module not in base.linear_shapes:
        raise AdapterRejected(f"{where} is not a linear layer of the base model")
    if not plan.selects(module):
        layers = f", layers_to_transform {list(plan.layers)}" if plan.layers is not None else ""
        raise AdapterRejected(
            f"{where} is not selected by target_modules {list(plan.targets)}{layers}"
        )
    for part, other in (("A", "B"), ("B", "A")):
        if part not in parts:
            raise AdapterRejected(f"{where} has lora_{other} but no lora_{part}")
    out, inp = base.linear_shapes[module]  # base weight: (out, in)
    r = plan.rank_for(module)
    _expect_shape(parts["A"], (r, inp), f"[r, in] with r={r}, base (out, in)=({out}, {inp})")
    _expect_shape(parts["B"], (out, r), f"[out, r] with r={r}, base (out, in)=({out}, {inp})")


def _expect_shape(t: TensorInfo, want: tuple[int, int], why: str) -> None:
    if t.shape != want:
        raise AdapterRejected(
            f"{ADAPTER_WEIGHTS}: tensor {t.name!r} has shape {list(t.shape)}, expected "
            f"{list(want)} ({why})"
        )


def _check_finite(label: str, data: bytes) -> None:
    """Load the (already header-checked) bytes with safetensors and refuse NaN / Inf values."""
    import torch
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as e:  # the library's own error types vary by version
        raise AdapterRejected(f"{label}: safetensors could not load it ({e})") from None
    for name in sorted(tensors):
        t = tensors[name]
        if not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise AdapterRejected(f"{label}: tensor {name!r} has {nan} NaN and {inf} Inf values")
