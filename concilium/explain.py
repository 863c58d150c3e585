"""Pydantic validation errors told in our terms: which field, what is wrong, what is valid.

Every config and spec family (the service YAML, query / token routers, MoE gatings, expert specs)
is a pydantic model or a union of them discriminated by `kind`. Their errors all come out as

    Problem(field="routers.retriever.agregate", value="'mean'",
            message="Extra inputs are not permitted (valid keys: aggregate, ...)")

- the field is the dotted path with the tagged union's tag left out (pydantic puts the chosen
  kind into the location: `routers.r.retriever.top_k` is `routers.r.top_k` to the user);
- a missing or unknown kind is the field `<path>.kind`, its message lists the valid kinds;
- a key that is not allowed lists the valid keys of the model it was found in;
- the offending value is shown when it is short (a scalar), never a whole mapping.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from concilium.errors import ConfigError

VALUE_LIMIT = 80  # characters of a bad value's repr shown in a message


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation error of a config or spec, for people."""

    field: str  # dotted path ('' for the whole input)
    message: str
    value: str | None = None  # repr of the bad value, when short enough to show

    def __str__(self) -> str:
        where = f"{self.field}={self.value}" if self.value is not None else self.field
        return f"{where}: {self.message}" if where else self.message


def problems(e: ValidationError, root: Any) -> list[Problem]:
    """Every error of `e`, raised validating `root` (a model class, or a union of them)."""
    return [explain(err, root) for err in e.errors()]


def first(e: ValidationError, root: Any) -> Problem:
    """The first error of `e` (the one a ConfigError names)."""
    return explain(e.errors()[0], root)


def config_error(e: ValidationError, root: Any, what: str) -> ConfigError:
    """The ConfigError of a `what` (e.g. "router config") that failed to validate against
    `root`: its first problem, the field named."""
    p = first(e, root)
    text = f"invalid {what} field {p}" if p.field else f"invalid {what}: {p}"
    return ConfigError(text, field=p.field or None)


def explain(err: Any, root: Any) -> Problem:
    """One pydantic error dict of a validation against `root`."""
    shown: list[str] = []
    holder: Any = None
    tp: Any = root
    for part in err["loc"]:
        holder = tp = _optional_model(tp)
        tp, is_tag = _step(tp, part)
        if not is_tag:
            shown.append(str(part))
    msg, kind = str(err["msg"]), str(err["type"])
    if kind == "extra_forbidden" and _is_model(holder):
        msg += f" (valid keys: {', '.join(sorted(holder.model_fields))})"
    if kind.startswith("union_tag"):
        shown.append(_discriminator(err))
        if _kinds(tp):
            msg += f" (valid kinds: {', '.join(sorted(_kinds(tp)))})"
    value = None if kind == "missing" else _short(err.get("input"))
    return Problem(".".join(shown), msg, value)


def _discriminator(err: Any) -> str:
    """The tag's field name of a union_tag_* error (pydantic quotes it in the context)."""
    return str((err.get("ctx") or {}).get("discriminator", "kind")).strip("'\"")


def _short(value: Any) -> str | None:
    """repr of a scalar bad value, cut to VALUE_LIMIT; None for containers and models."""
    if isinstance(value, dict | list | tuple | set | BaseModel):
        return None
    text = repr(value)
    return text if len(text) <= VALUE_LIMIT else text[: VALUE_LIMIT - 3] + "..."


def _step(tp: Any, part: Any) -> tuple[Any, bool]:
    """(the type at `part` inside `tp`, or None when it cannot be followed; whether `part` is a
    tagged union's tag)."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if _is_model(tp):
        field = tp.model_fields.get(str(part))
        return (None if field is None else field.annotation), False
    if get_origin(tp) is dict:
        return get_args(tp)[1], False
    if part in _kinds(tp):
        return next(m for m in get_args(tp) if _kinds(m) == [part]), True
    return None, False


def _optional_model(tp: Any) -> Any:
    """The model of an optional model (`Config | None`), else `tp`."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    models = [m for m in get_args(tp) if _is_model(m)] if _is_union(tp) else []
    return models[0] if len(models) == 1 and type(None) in get_args(tp) else tp


def _kinds(tp: Any) -> list[str]:
    """The `kind` tags of a union of configs (of one config), else []."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if _is_union(tp):
        return [k for m in get_args(tp) for k in _kinds(m)]
    field = tp.model_fields.get("kind") if _is_model(tp) else None
    return [] if field is None else [str(k) for k in get_args(field.annotation)]


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)
