"""OpenAI-compatible request/response models, plus concilium's `routing` options object."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from concilium.registry.specs import unicode_problem


class _Body(BaseModel):
    """A request body part: text in any declared field must be valid Unicode (see
    `unicode_problem`); the 400 names the field."""

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        if (problem := unicode_problem(v)) is not None:
            raise ValueError(problem)
        return v


class TokenRouting(_Body):
    """Per-request token-level routing among adapters (served from the token-routing issue on)."""

    model_config = ConfigDict(extra="forbid")
    router: Literal["phatgoose", "arrow", "uniform", "none"] = Field(
        default="none", description="Token router mixing adapters inside the replica."
    )
    top_k: int = Field(default=2, ge=1, le=16, description="Adapters mixed per token.")
    candidates: int | None = Field(
        default=None,
        ge=1,
        description="Adapters kept from the query-level decision (global prior).",
    )


class RoutingOptions(_Body):
    """The caller's objective and routing choices (`extra_body={"routing": {...}}`)."""

    model_config = ConfigDict(extra="forbid")
    max_cost: float | None = Field(default=None, ge=0, description="Cost ceiling for this request.")
    max_latency_ms: float | None = Field(
        default=None, gt=0, description="Latency ceiling for this request, in milliseconds."
    )
    max_energy_j: float | None = Field(
        default=None,
        gt=0,
        description="Energy ceiling in joules (only experts that declare their energy qualify).",
    )
    quality_weight: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="1 = quality only, 0 = cost only (default: the router's, usually 1).",
    )
    strategy: Literal["single", "cascade", "ensemble"] = Field(
        default="single", description="One expert, an escalating cascade, or a fused ensemble."
    )
    max_experts: int | None = Field(
        default=None,
        ge=1,
        le=16,
        description="Experts an ensemble or cascade may run (default 3; single always runs 1).",
    )
    fusion: Literal["vote", "logits"] | None = Field(
        default=None,
        description="How an ensemble's answers are fused: 'vote' (gate-weighted vote over the "
        "answers) or 'logits' (members that are adapters of one local model decode together in "
        "one replica, each token chosen from their gate-weighted mixture). Default: the "
        "service's strategies.fusion.",
    )
    allowed_experts: list[str] | None = Field(
        default=None, description="Only these experts may answer (and be fallen back to)."
    )
    excluded_experts: list[str] = Field(
        default_factory=list, description="These experts may never answer."
    )
    deadline_ms: float | None = Field(
        default=None,
        gt=0,
        description="Give up (HTTP 504) and cancel the expert's work after this many ms.",
    )
    token_routing: TokenRouting | None = Field(
        default=None, description="Token-level adapter mixing inside the expert replica."
    )


class ContentPart(_Body):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; non-text content parts are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise ValueError(f"content parts of type {bad} are not supported (text only)")
        return "".join(p.text or "" for p in self.content)


# OpenAI parameters that change what the answer must be (tool calls, JSON, log-probabilities,
# token biases): refused by name unless given their neutral value, never silently ignored.
_UNSUPPORTED = (
    *("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call"),
    *("response_format", "logit_bias", "presence_penalty", "frequency_penalty"),
)
_NULLABLE = ("temperature", "top_p", "n", "stream", "min_tokens")  # null: the default


def _neutral(field: str, v: Any) -> bool:
    if field in ("tool_choice", "function_call"):
        return v in (None, "none", "auto")
    if field == "response_format":
        return v is None or v.get("type") == "text"
    return not v  # False, 0, [] or {}


class ChatCompletionRequest(_Body):
    """POST /v1/chat/completions. Other unknown OpenAI parameters are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(
        default="auto",
        min_length=1,
        description="auto | router-<name> | <expert> | <base>:<adapter>",
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)
    min_tokens: int = Field(
        default=0, ge=0, le=8192, description="Suppress end-of-sequence before this many (vLLM's)."
    )
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1, description="Only n=1 is supported.")
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    user: str | None = None
    routing: RoutingOptions | None = None
    logprobs: bool | None = Field(default=None, description="Not supported: true is a 400.")
    top_logprobs: int | None = Field(default=None, description="Not supported: >0 is a 400.")
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="Not supported (experts answer text): a tool is a 400."
    )
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description="Not supported: only 'none' and 'auto' are accepted."
    )
    functions: list[dict[str, Any]] | None = Field(
        default=None, description="Not supported (legacy tools): a function is a 400."
    )
    function_call: str | dict[str, Any] | None = Field(
        default=None, description="Not supported: only 'none' and 'auto' are accepted."
    )
    response_format: dict[str, Any] | None = Field(
        default=None, description="Only {'type': 'text'}: JSON modes are a 400."
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Not supported: a bias is a 400."
    )
    presence_penalty: float | None = Field(
        default=None, description="Not supported: a non-zero penalty is a 400."
    )
    frequency_penalty: float | None = Field(
        default=None, description="Not supported: a non-zero penalty is a 400."
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI's schema makes these nullable; a client serialising unset fields sends null."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in _NULLABLE}
        return data

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        if not _neutral(str(info.field_name), v):
            raise ValueError(f"{info.field_name} is not supported (experts answer plain text)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_ok(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v == "" or (isinstance(v, list) and (len(v) > 4 or any(not s for s in v))):
            raise ValueError("stop takes at most 4 non-empty strings")
        return v

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class EmbeddingRequest(_Body):
    """POST /v1/embeddings."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(default="auto", min_length=1)
    input: str | list[str] = Field(description="Text or list of texts to embed.")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="float lists, or base64 of little-endian float32 (openai's)."
    )
    dimensions: int | None = Field(
        default=None,
        ge=1,
        strict=True,  # an integer: true is a 400, not 1
        description="Accepted when it is the chosen expert's own vector size (vectors are never "
        "shortened): any other size is a 400.",
    )
    routing: RoutingOptions | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class FeedbackRequest(_Body):
    """POST /v1/feedback: a quality score for an answered request, keyed by its decision id."""

    model_config = ConfigDict(extra="forbid")
    decision_id: str = Field(
        min_length=1,
        max_length=128,
        description="routing.decision_id (or the x-concilium-decision-id header) of the answer.",
    )
    score: float = Field(
        ge=0,
        le=1,
        strict=True,  # a number: true or "0.5" is a 400, not a score of 1.0 / 0.5
        description="Quality of the answer: 0 = wrong, 1 = right.",
    )


def model_card(model_id: str, owned_by: str, **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owned_by, **extra}
