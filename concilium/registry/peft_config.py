"""The strict model of a PEFT LoRA ``adapter_config.json``, and the checks run on it.

``LoraAdapterConfig`` accepts only the keys PEFT (0.17-0.21) writes for LoRA; keys naming features
concilium does not run must be null or the value PEFT writes when the feature is off (false for
flags, ``{}`` for loftq_config): PEFT turns any other value on, an empty ``{}`` sub-config included,
or fails on it. ``init_lora_weights`` must be one that leaves the base model alone (PiSSA and OLoRA
rewrite the shared base's weights when PEFT loads the adapter). Strings PEFT would treat as regexes
must be plain module names, ranks must be within the cap, and every target must match a linear
layer of the base model. ``parse_config`` returns the ``LoraPlan`` the adapter's tensor checks
need; it selects modules and ranks exactly as PEFT's ``check_target_module_exists`` and
``get_pattern_key`` do, ``layers_to_transform`` / ``layers_pattern`` included.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from concilium.errors import AdapterRejected
from concilium.registry.fs_checks import shown

if TYPE_CHECKING:
    from concilium.registry.validate import ModelInfo

__all__ = ["ADAPTER_CONFIG", "LoraAdapterConfig", "LoraPlan", "parse_config"]

ADAPTER_CONFIG = "adapter_config.json"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_TRANSFORMERS_MODULE = re.compile(r"transformers(\.[A-Za-z_][A-Za-z0-9_]*)*")

_UNSUPPORTED: dict[str, str] = {
    "auto_map": "it makes transformers run shipped code",
    "use_dora": "DoRA is not supported",
    "modules_to_save": "it would replace base-model weights",
    "lora_bias": "LoRA bias terms are not supported",
    "target_parameters": "LoRA on raw parameters is not supported",
    "trainable_token_indices": "it would replace embedding rows",
    "layer_replication": "it would duplicate base-model layers",
    "megatron_config": "Megatron layers are not supported",
    "loftq_config": "LoftQ is not supported",
    "eva_config": "EVA is not supported",
    "corda_config": "CorDA is not supported",
    "use_qalora": "QA-LoRA is not supported",
    "use_bdlora": "BD-LoRA is not supported",
    "arrow_config": "PEFT's Arrow routing is not supported (concilium routes itself)",
    "alora_invocation_tokens": "activated LoRA is not supported",
    "kasa_config": "KaSA is not supported",
    "lora_ga_config": "LoRA-GA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "velora_config": "VeLoRA is not supported",
}
# the value PEFT writes for a feature that is off, where that is not None
_OFF_VALUES: dict[str, Any] = {"use_dora": False, "use_qalora": False, "lora_bias": False}
_OFF_VALUES["loftq_config"] = {}
SAFE_INITS = (True, False, "gaussian")  # inits that touch only lora_A / lora_B, overwritten on load
TaskType = Literal[
    "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"
]


class LoraAdapterConfig(BaseModel):
    """adapter_config.json as PEFT (0.17-0.21) writes it for LoRA; any other key is refused.

    Keys that name features we do not run are typed `Any` here and must be null, false or empty
    (checked after parsing, with a reason; see `_UNSUPPORTED`). `auto_mapping` may name a
    transformers class only (`_check_auto_mapping`).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    peft_type: Literal["LORA"]
    r: int = Field(ge=1)
    lora_alpha: float = Field(gt=0, allow_inf_nan=False)
    target_modules: list[str] | str
    task_type: TaskType | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_version: str | None = None
    inference_mode: bool = True
    bias: Literal["none"] = "none"
    fan_in_fan_out: bool = False
    lora_dropout: float = Field(default=0.0, ge=0, le=1)
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    qalora_group_size: int = Field(default=16, ge=1)
    ensure_weight_tying: bool = False
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    exclude_modules: list[str] | str | None = None
    megatron_core: Literal["megatron.core"] | None = "megatron.core"
    runtime_config: dict[str, bool] | None = None
    auto_mapping: Any = None
    auto_map: Any = None
    use_dora: Any = None
    modules_to_save: Any = None
    lora_bias: Any = None
    target_parameters: Any = None
    trainable_token_indices: Any = None
    layer_replication: Any = None
    megatron_config: Any = None
    loftq_config: Any = None
    eva_config: Any = None
    corda_config: Any = None
    use_qalora: Any = None
    use_bdlora: Any = None
    arrow_config: Any = None
    alora_invocation_tokens: Any = None
    kasa_config: Any = None
    lora_ga_config: Any = None
    monteclora_config: Any = None
    velora_config: Any = None


def _selects(module: str, names: tuple[str, ...], exact: bool) -> bool:
    """PEFT's rule: a str target is a pattern the module path full-matches (plain by then, so
    only '.' is special); list items match the path or a '.'-suffix of it."""
    if exact:
        return any(re.fullmatch(n, module) for n in names)
    return any(module == n or module.endswith("." + n) for n in names)


def _layer_index(module: str, patterns: tuple[str, ...]) -> int | None:
    """The layer number PEFT reads from a module path for `layers_to_transform`."""
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        hits = (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module) for p in patterns)
        match = next((m for m in hits if m), None)
    return int(match["idx"]) if match else None


@dataclass(frozen=True, slots=True)
class LoraPlan:
    """The parts of a checked adapter config that the tensor checks need."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    exact: bool  # target_modules was a single string
    exclude: tuple[str, ...]
    exclude_exact: bool
    rank_pattern: tuple[tuple[str, int], ...]
    layers: tuple[int, ...] | None = None  # layers_to_transform; None: every layer
    layers_pattern: tuple[str, ...] = ()

    def selects(self, module: str) -> bool:
        """PEFT's check_target_module_exists: excluded, exact, then suffix within `layers`."""
        if _selects(module, self.exclude, self.exclude_exact):
            return False
        if self.exact or module in self.targets:
            return _selects(module, self.targets, self.exact)
        if not _selects(module, self.targets, False):
            return False
        return self.layers is None or _layer_index(module, self.layers_pattern) in self.layers

    def rank_for(self, module: str) -> int:
        """PEFT's get_pattern_key: the first rank_pattern key the path ends with, as a pattern."""
        hits = (r for k, r in self.rank_pattern if re.match(rf"(.*\.)?({k})$", module))
        return next(hits, self.rank)


def parse_config(raw: Any, base: ModelInfo, max_rank: int) -> LoraPlan:
    if not isinstance(raw, dict):
        raise AdapterRejected(f"{ADAPTER_CONFIG}: must be a JSON object, got {type(raw).__name__}")
    try:
        cfg = LoraAdapterConfig.model_validate(raw)
    except ValidationError as e:
        raise AdapterRejected(f"{ADAPTER_CONFIG}: {_pydantic_errors(e)}") from None
    _check_unsupported(cfg)
    _check_auto_mapping(cfg.auto_mapping)
    _check_plain_names(cfg)
    _check_layers(cfg)
    _check_ranks(cfg, max_rank)
    plan = LoraPlan(
        rank=cfg.r,
        alpha=cfg.lora_alpha,
        targets=_names(cfg.target_modules),
        exact=isinstance(cfg.target_modules, str),
        exclude=_names(cfg.exclude_modules),
        exclude_exact=isinstance(cfg.exclude_modules, str),
        rank_pattern=tuple(cfg.rank_pattern.items()),
        layers=_layers(cfg.layers_to_transform),
        layers_pattern=_names(cfg.layers_pattern or None),
    )
    _check_targets_exist(plan, base)
    return plan


def _check_unsupported(cfg: LoraAdapterConfig) -> None:
    """Features we do not run must be off the way PEFT writes them; `{}` would turn one on."""
    for key, reason in _UNSUPPORTED.items():
        value, off = getattr(cfg, key), _OFF_VALUES.get(key)
        if value is not None and not (type(value) is type(off) and value == off):
            allowed = "null" if off is None else f"null or {json.dumps(off)}"
            raise AdapterRejected(
                f"{ADAPTER_CONFIG}: {key}={_short(value)} refused: {reason} (must be {allowed})"
            )
    if cfg.init_lora_weights not in SAFE_INITS:
        raise AdapterRejected(
            f"{ADAPTER_CONFIG}: init_lora_weights={cfg.init_lora_weights!r} refused: only true, "
            "false or 'gaussian' (PiSSA and OLoRA rewrite the base model's weights when PEFT "
            "loads the adapter; MiCA, EVA, CorDA, LoftQ, LoRA-GA and orthogonal are not supported)"
        )


def _check_layers(cfg: LoraAdapterConfig) -> None:
    """The combinations PEFT's LoraConfig refuses at load time."""
    if isinstance(cfg.target_modules, str) and (
        cfg.layers_to_transform is not None or cfg.layers_pattern is not None
    ):
        raise AdapterRejected(
            f"{ADAPTER_CONFIG}: layers_to_transform / layers_pattern need target_modules to be "
            f"a list, not the pattern {cfg.target_modules!r}"
        )
    if cfg.layers_pattern and cfg.layers_to_transform is None:
        raise AdapterRejected(
            f"{ADAPTER_CONFIG}: layers_pattern={_short(cfg.layers_pattern)} needs "
            "layers_to_transform"
        )


def _layers(value: int | list[int] | None) -> tuple[int, ...] | None:
    """layers_to_transform as PEFT uses it: None or [] mean every layer."""
    if isinstance(value, int):
        return (value,)
    return tuple(value) if value else None


def _check_auto_mapping(value: Any) -> None:
    """PEFT writes {base_model_class, parent_library} when task_type is None, and AutoPeftModel
    imports parent_library; only a class of transformers itself may be named."""
    ok = value is None or (
        isinstance(value, dict)
        and set(value) == {"base_model_class", "parent_library"}
        and isinstance(cls := value["base_model_class"], str)
        and cls.isidentifier()
        and isinstance(lib := value["parent_library"], str)
        and _TRANSFORMERS_MODULE.fullmatch(lib) is not None
    )
    if not ok:
        raise AdapterRejected(
            f"{ADAPTER_CONFIG}: auto_mapping={_short(value)} refused: PEFT would import it; "
            "only a transformers class may be named"
        )


def _names(value: list[str] | str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _check_plain_names(cfg: LoraAdapterConfig) -> None:
    """Strings PEFT treats as regexes must be plain module names (no metacharacters)."""
    regexes = [("rank_pattern", k) for k in cfg.rank_pattern]
    regexes += [("alpha_pattern", k) for k in cfg.alpha_pattern]
    for key in ("target_modules", "exclude_modules"):
        if isinstance(value := getattr(cfg, key), str):
            regexes.append((key, value))
    regexes += [("layers_pattern", p) for p in _names(cfg.layers_pattern)]
    for key, name in regexes:
        if not _PLAIN_NAME.fullmatch(name):
            raise AdapterRejected(
                f"{ADAPTER_CONFIG}: {key} {name!r} is a regex; only plain module names are allowed"
            )


def _check_ranks(cfg: LoraAdapterConfig, max_rank: int) -> None:
    ranks = [("r", cfg.r)] + [(f"rank_pattern[{k!r}]", v) for k, v in cfg.rank_pattern.items()]
    for key, r in ranks:
        if not 1 <= r <= max_rank:
            raise AdapterRejected(f"{ADAPTER_CONFIG}: {key}={r} outside the rank cap 1..{max_rank}")
    for k, alpha in cfg.alpha_pattern.items():
        if not 0 < alpha < float("inf"):
            raise AdapterRejected(f"{ADAPTER_CONFIG}: alpha_pattern[{k!r}]={alpha} must be > 0")


def _check_targets_exist(plan: LoraPlan, base: ModelInfo) -> None:
    for t in plan.targets:
        if not any(_selects(m, (t,), plan.exact) for m in base.linear_shapes):
            raise AdapterRejected(
                f"{ADAPTER_CONFIG}: target module {t!r} matches no linear layer of the base "
                f"model at {shown(base.path)}"
            )


def _pydantic_errors(e: ValidationError) -> str:
    """One message per offending top-level key, at most five."""
    seen: dict[str, str] = {}
    for err in e.errors():
        key = str(err["loc"][0]) if err["loc"] else "config"
        if key in seen:
            continue
        if err["type"] == "extra_forbidden":
            seen[key] = f"unknown key {key!r}"
        else:
            seen[key] = f"{key}: {err['msg']} (got {_short(err.get('input'))})"
    return "; ".join(list(seen.values())[:5])


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
