"""ExpertSpec: what a caller registers. A pydantic discriminated union on `kind`.

`model`  a local Hugging Face model directory (causal LM; a sentence-transformer for `embed`)
`lora`   a PEFT LoRA adapter directory on a registered `model` expert (its `base`)
`remote` an OpenAI-compatible endpoint: URL + model name + the env var holding its API key
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator

from concilium.errors import SpecError
from concilium.explain import problems

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_EXAMPLES = 64
MAX_TEXT = 2000
MAX_LABELS = 64  # categories, tags
MAX_LABEL = 200
# ceilings that keep every estimate finite (a price near the float maximum overflows once
# multiplied by a token count)
MAX_PRICE = 1e6  # per 1k tokens
MAX_PARAMS = 10**15
MAX_MS = 1e9
CEILINGS = {
    "price_in_per_1k": MAX_PRICE,
    "price_out_per_1k": MAX_PRICE,
    "energy_j_per_1k_tokens": MAX_PRICE,
    "params_total": MAX_PARAMS,
    "params_active": MAX_PARAMS,
    "expected_latency_ms": MAX_MS,
}


def unicode_problem(value: Any) -> str | None:
    """What in `value` (a str, or lists / dicts of them) is not valid Unicode text, or None.

    JSON may escape an unpaired UTF-16 surrogate (``"\\ud800"``) and Python's json module decodes it
    into a str that no UTF-8 encoder (response bodies, SQLite, tokenizers, httpx) accepts, so such
    text is refused where it enters, naming its place.
    """
    found = invalid_text(value)
    if found is None:
        return None
    where, _, pos = found
    item = f"item {where} " if where else ""
    return f"{item}has an unpaired UTF-16 surrogate at character {pos} (not valid Unicode)"


def invalid_text(value: Any) -> tuple[str, str, int] | None:
    """The first string (a dict key or value, in order) in `value` — a str, or lists / tuples /
    dicts of them nested to any depth — that UTF-8 cannot encode: (where, the string, the
    position of its first bad character); None when every string is valid Unicode."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            if v.isascii():
                continue
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return where, v, e.start
        elif isinstance(v, list | tuple):
            stack.extend(reversed([(f"{where}[{i}]", x) for i, x in enumerate(v)]))
        elif isinstance(v, dict):
            pairs = [(f"{where}[key {k!r}]", k) for k in v]
            pairs += [(f"{where}[{k!r}]", x) for k, x in v.items()]
            stack.extend(reversed(pairs))
    return None


def _stored(info: ValidationInfo) -> bool:
    """Whether a spec is being read back from the registry (see `parse_spec`)."""
    return bool(info.context and info.context.get("stored"))


class _SpecBase(BaseModel):
    """Fields every expert carries, whatever its kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Unique expert name: lowercase letters, digits, '.', '_', '-'.")
    task: Literal["generate", "embed"] = Field(
        default="generate", description="What the expert does: chat generation or embeddings."
    )
    description: str = Field(
        default="", max_length=MAX_TEXT, description="What the expert is good at."
    )
    examples: list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]] = Field(
        default_factory=list,
        max_length=MAX_EXAMPLES,
        description="Pilot queries this expert answers well (RouterRetriever pilots).",
    )
    categories: list[str] = Field(
        default_factory=list, description="CoE categories this expert serves."
    )
    price_in_per_1k: float = Field(
        default=0.0, ge=0, description="Price per 1k input tokens, in the caller's unit."
    )
    price_out_per_1k: float = Field(
        default=0.0, ge=0, description="Price per 1k output tokens, in the caller's unit."
    )
    params_total: int | None = Field(default=None, ge=0, description="Total parameter count.")
    params_active: int | None = Field(
        default=None, ge=0, description="Parameters active per token (MoE / adapters)."
    )
    tags: list[str] = Field(default_factory=list, description="Free-form labels.")
    expected_latency_ms: float | None = Field(
        default=None,
        gt=0,
        description="Declared latency of one response (ms); a measured latency wins.",
    )
    energy_j_per_1k_tokens: float | None = Field(
        default=None,
        ge=0,
        description="Declared energy per 1k tokens (J); lets callers set routing.max_energy_j.",
    )
    train_examples: list[dict[str, str]] = Field(
        default_factory=list,
        max_length=4096,
        description="Optional {prompt, completion} pairs for token-router gate training.",
    )

    @field_validator("*")
    @classmethod
    def _finite_and_unicode(cls, v: Any, info: ValidationInfo) -> Any:
        """Numbers must be finite (JSON has no Infinity; the response would be no JSON) and text
        valid Unicode. Rows stored before this check existed still load (`stored=True`)."""
        if _stored(info):
            return v
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}")
        if (problem := unicode_problem(v)) is not None:
            raise ValueError(problem)
        return v

    @field_validator(*CEILINGS)
    @classmethod
    def _below_ceiling(cls, v: float | None, info: ValidationInfo) -> float | None:
        top = CEILINGS[str(info.field_name)]
        if v is not None and v > top and not _stored(info):
            raise ValueError(f"must be at most {top:g}")
        return v

    @field_validator("categories", "tags")
    @classmethod
    def _labels_capped(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if _stored(info):
            return v
        if len(v) > MAX_LABELS:
            raise ValueError(f"at most {MAX_LABELS} entries, got {len(v)}")
        if too_long := [x for x in v if len(x) > MAX_LABEL]:
            raise ValueError(f"entries are at most {MAX_LABEL} characters, got {len(too_long[0])}")
        return v

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str, info: ValidationInfo) -> str:
        # the whole name: NAME_RE's `$` also matches before a final newline ("x\n" went into
        # headers); a row stored before this check existed still loads
        if not (NAME_RE.fullmatch(v) or (_stored(info) and NAME_RE.match(v))):
            raise ValueError(
                f"name {v!r} must match {NAME_RE.pattern} (lowercase, digits, '.', '_', '-')"
            )
        if v.startswith("router-") or v == "auto" or ":" in v:
            raise ValueError(f"name {v!r} is reserved (auto, router-*, names with ':')")
        return v


class ModelSpec(_SpecBase):
    """A local Hugging Face model directory."""

    kind: Literal["model"] = "model"
    path: str = Field(description="Directory with config.json and *.safetensors weights.")


class LoraSpec(_SpecBase):
    """A PEFT LoRA adapter directory on a registered base model expert."""

    kind: Literal["lora"] = "lora"
    base: str = Field(description="Name of the registered `model` expert this adapter applies to.")
    path: str = Field(
        description="Adapter directory: adapter_config.json + adapter_model.safetensors."
    )


class RemoteSpec(_SpecBase):
    """An OpenAI-compatible remote endpoint."""

    kind: Literal["remote"] = "remote"
    url: str = Field(description="Base URL of the OpenAI-compatible API, e.g. https://host/v1.")
    model_name: str = Field(description="The `model` value to send to the remote endpoint.")
    api_key_env: str | None = Field(
        default=None, description="Name of the environment variable holding the remote API key."
    )
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="Per-request timeout.")


ExpertSpec = Annotated[ModelSpec | LoraSpec | RemoteSpec, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[ModelSpec | LoraSpec | RemoteSpec] = TypeAdapter(ExpertSpec)


def parse_spec(data: Any, *, stored: bool = False) -> ModelSpec | LoraSpec | RemoteSpec:
    """Validate a mapping as an ExpertSpec; raise SpecError naming the bad field(s).

    `stored`: a row read back from the registry, validated when it was written; the checks added
    since (finite numbers, valid Unicode, no newline ending a name) are skipped so an older
    registry stays readable.
    """
    from pydantic import ValidationError

    try:
        return _ADAPTER.validate_python(data, context={"stored": stored})
    except ValidationError as e:
        found = problems(e, ExpertSpec)
        details = "; ".join(str(p) for p in found)
        raise SpecError(f"invalid expert spec: {details}", field=found[0].field or None) from None


def spec_to_dict(spec: ModelSpec | LoraSpec | RemoteSpec) -> dict[str, Any]:
    """JSON-ready dict of a spec (the inverse of parse_spec)."""
    return spec.model_dump(mode="json")
