"""pydantic's validation errors as `config check` issues: where in the YAML each one is, and
what it says, with the value given (never a secret's: those say ``(value hidden)``)."""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr

from rostersync.config.types import quoted
from rostersync.logs import secret_key

PathKey = tuple[str | int, ...]


def _child(current: Any, seg: str | int) -> tuple[bool, Any]:
    if isinstance(current, Mapping) and seg in current:
        return True, current[seg]
    if isinstance(current, list) and isinstance(seg, int) and 0 <= seg < len(current):
        return True, current[seg]
    return False, None


def map_loc(
    loc: tuple[str | int, ...], data: Any, *, missing_key: bool = True
) -> tuple[PathKey, str | None]:
    """Follow a pydantic error location through the data, dropping union tags and the like.

    Returns the deepest existing path and, if the last element is a key that is absent
    (a missing field, when ``missing_key``), that key's name.
    """
    path: list[str | int] = []
    current = data
    missing: str | None = None
    for i, seg in enumerate(loc):
        found, child = _child(current, seg)
        if found:
            path.append(seg)
            current = child
        elif (
            missing_key
            and i == len(loc) - 1
            and isinstance(seg, str)
            and isinstance(current, Mapping)
        ):
            missing = seg
        # otherwise a discriminator tag or a function-validator name: skip it
    return tuple(path), missing


def message(err: Mapping[str, Any], missing: str | None, model: type[BaseModel]) -> str:
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    if kind == "missing":
        return f"{missing} is required" if missing else "is required"
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        # A block whose kind its `type` key names (a source, an auth): pydantic's wording
        # speaks of discriminators and tags.
        ctx = err.get("ctx") or {}
        key = str(ctx.get("discriminator", "'type'")).strip("'")
        if kind == "union_tag_not_found":
            return f"{key} is required"
        return f"{key} {ctx.get('tag')!r} is not one of {ctx.get('expected_tags')}"
    if kind == "extra_forbidden":
        loc = tuple(err["loc"])
        close = difflib.get_close_matches(str(loc[-1]), _keys_at(model, loc[:-1]), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key (not allowed here){hint}"
    if kind in ("model_type", "dict_type"):
        # pydantic's "a valid dictionary or instance of Safety" names a class of ours.
        return f"must be a mapping of keys (key: value), not {kind_of(err.get('input'))}"
    if kind == "list_type":
        # pydantic's "Input should be a valid list" says neither what was found nor what a
        # list looks like in YAML (`sites: North High, South Middle` is one string).
        return f"must be a list ([a, b], or one '- item' a line), not {kind_of(err.get('input'))}"
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if missing:
        return f"{missing}: {msg}"
    if kind in ("value_error", "assertion_error"):
        # Our validators' own messages: they quote the value where it helps ("'abc' is not
        # a duration"), and never a secret's.
        return msg
    given = _given(err.get("input"), kind)
    if given is None:
        return msg
    if kind.endswith("_parsing"):
        # "Input should be a valid integer, unable to parse string as an integer": the value
        # given says the rest.
        msg = msg.partition(", ")[0]
    if _is_secret(model, tuple(err["loc"])):
        return f"{msg} (value hidden)"
    return f"{msg}, got {given}"


def _given(value: object, kind: str) -> str | None:
    """The value that pydantic's own check (a type, a range, a choice) refused, as a message
    shows it: a scalar quoted and cut to :data:`SHOWN_VALUE` characters, a mapping or a list
    by its kind. None when there is nothing to show (the error is about a whole block)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return quoted(value)
    if value is None:
        return "an empty value"
    if isinstance(value, dict | list) and kind.endswith("_type"):
        return kind_of(value)
    return None


def _is_secret(model: type[BaseModel], loc: tuple[str | int, ...]) -> bool:
    """Whether the value at ``loc`` is a secret: the config models type it SecretStr (the
    ``x`` of a secret pair), or a key on the way is named like one (``client_secret_file``)."""
    # A URL is no secret for its name (`token_url`); a password in it is masked anyway.
    if any(isinstance(s, str) and secret_key(s) and not s.endswith("_url") for s in loc):
        return True
    return any(t is SecretStr for t in _types_at(model, loc))


def kind_of(value: object) -> str:
    """What kind of YAML value was written: a list or a mapping is named, not shown."""
    if value is None:
        return "empty"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else type(value).__name__


def _types(annotation: Any) -> list[Any]:
    """The concrete types behind an annotation (Annotated, Optional and unions unwrapped)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _types(get_args(annotation)[0])
    if origin is Union or isinstance(annotation, types.UnionType):
        return [t for arg in get_args(annotation) for t in _types(arg)]
    return [annotation]


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _keys_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The keys the config accepts at a pydantic error location (for "did you mean")."""
    return sorted(
        {
            info.alias or name
            for t in _types_at(model, loc)
            if _is_model(t)
            for name, info in t.model_fields.items()
        }
    )


def _types_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[Any]:
    """The types the config models allow at a pydantic error location (union tags such as
    "oauth1" followed to their models)."""
    current: list[Any] = [model]
    for seg in loc:
        found: list[Any] = []
        for t in current:
            origin, args = get_origin(t), get_args(t)
            if _is_model(t):
                for name, info in t.model_fields.items():
                    if seg in (name, info.alias):
                        found += _types(info.annotation)
            elif origin in (dict, Mapping) and len(args) == 2 and isinstance(seg, str):
                found += _types(args[1])
            elif origin in (list, tuple) and args and isinstance(seg, int):
                found += _types(args[0])
        if not found:
            # A union tag ("oneroster", "oauth1"): keep the models whose Literal field has it.
            found = [
                t
                for t in current
                if _is_model(t)
                and any(
                    get_origin(info.annotation) is Literal and seg in get_args(info.annotation)
                    for info in t.model_fields.values()
                )
            ]
        current = found or current
    return current
