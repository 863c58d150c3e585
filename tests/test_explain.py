"""Validation errors of every config family come out the same way: the field without the union's
tag, `<path>.kind` for a bad kind with the valid kinds, valid keys for a typo, the bad value."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from concilium.errors import ConfigError, SpecError
from concilium.explain import config_error, first, problems
from concilium.registry.specs import parse_spec
from concilium.routers.query import build_router
from concilium.routers.token import build_token_router
from concilium.routers.token.moe_gating import build_gating


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(default=1, ge=1)


class Alpha(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["alpha"] = "alpha"
    rate: float = 0.5
    inner: Inner | None = None


class Beta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["beta"] = "beta"
    name: str = "b"


Family = Annotated[Alpha | Beta, Field(discriminator="kind")]


class Root(BaseModel):
    model_config = ConfigDict(extra="forbid")
    things: dict[str, Family] = Field(default_factory=dict)


def fail(data: Any, root: Any = Root) -> ValidationError:
    with pytest.raises(ValidationError) as e:
        TypeAdapter(root).validate_python(data)
    return e.value


def test_the_tag_is_left_out_of_the_field_and_a_typo_lists_the_valid_keys() -> None:
    p = first(fail({"things": {"t": {"kind": "alpha", "rat": 2}}}), Root)
    assert p.field == "things.t.rat"
    assert "valid keys: inner, kind, rate" in p.message
    assert p.value == "2"
    assert str(p).startswith("things.t.rat=2: ")


@pytest.mark.parametrize("data", [{"rate": 1}, {"kind": "gamma"}])
def test_a_missing_or_unknown_kind_is_the_kind_field_with_the_valid_kinds(data: Any) -> None:
    p = first(fail({"things": {"t": data}}), Root)
    assert p.field == "things.t.kind"
    assert "valid kinds: alpha, beta" in p.message
    assert p.value is None  # the whole mapping is not shown


def test_an_optional_model_is_followed_for_its_valid_keys() -> None:
    p = first(fail({"things": {"t": {"kind": "alpha", "inner": {"sise": 3}}}}), Root)
    assert p.field == "things.t.inner.sise"
    assert "valid keys: size" in p.message


def test_a_long_value_is_cut_and_a_missing_value_not_shown() -> None:
    p = first(fail({"things": {"t": {"kind": "beta", "name": 7}}}), Root)
    assert (p.field, p.value) == ("things.t.name", "7")
    long = first(fail({"things": {"t": {"kind": "alpha", "rate": "x" * 500}}}), Root)
    assert long.value is not None and len(long.value) == 80 and long.value.endswith("...")


def test_every_error_is_explained_and_a_root_error_names_no_field() -> None:
    e = fail({"things": {"a": {"kind": "alpha", "rate": "no"}, "b": {"kind": "beta", "x": 1}}})
    assert [p.field for p in problems(e, Root)] == ["things.a.rate", "things.b.x"]
    err = config_error(fail([1, 2]), Root, "thing config")
    assert err.field is None and err.message.startswith("invalid thing config: ")


@pytest.mark.parametrize(
    ("build", "config", "field"),
    [
        (build_router, {"kind": "retreiver"}, "kind"),
        (build_router, {"aggregate": "mean"}, "kind"),
        (build_router, {"kind": "retriever", "agregate": "mean"}, "agregate"),
        (build_token_router, {"kind": "arow"}, "kind"),
        (build_token_router, {"kind": "arrow", "top_k": 0}, "top_k"),
        (build_gating, {"kind": "topk"}, "kind"),
    ],
)
def test_the_router_families_name_the_field(build: Any, config: Any, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        build(config)
    assert e.value.field == field
    if field == "kind":
        assert "valid kinds" in e.value.message
    if field == "agregate":
        assert "valid keys" in e.value.message and "aggregate" in e.value.message


def test_an_expert_spec_names_its_field() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({"kind": "lora", "name": "x", "base": "b", "path": "/p", "bogus": 1})
    assert e.value.field == "bogus"
    with pytest.raises(SpecError) as e:
        parse_spec({"kind": "adapter", "name": "x"})
    assert e.value.field == "kind" and "valid kinds: lora, model, remote" in e.value.message
