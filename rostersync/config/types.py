"""Building blocks for config models, shared by the core and by connectors' own source models.

* :class:`StrictModel` forbids unknown keys (a typo must be an error, not silently ignored).
* :data:`Duration` accepts ``90``, ``"45s"``, ``"30m"``, ``"1h"``, ``"1d"``, ``"1h30m"``.
* :data:`ConfigPath` resolves a relative path against the config file's folder.
* :func:`resolve_secret` implements the ``x`` / ``x_file`` pair every secret key allows.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    PlainSerializer,
    SecretStr,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from rostersync.logs import scrub

_DURATION = re.compile(r"^\s*(?:(\d+)d)?\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?\s*$")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


#: Longer than any schedule, lease or timeout needs; beyond it date arithmetic overflows.
MAX_DURATION = timedelta(days=36500)


def parse_duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return _bounded(value)
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 15m, 1h or 1d")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{quoted(value)} is not a duration")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return _bounded(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return _bounded(int(text))
        m = _DURATION.match(text)
        if text and m and any(m.groups()):
            d, h, mi, s = (int(g) if g else 0 for g in m.groups())
            return _bounded(d * 86400 + h * 3600 + mi * 60 + s)
    raise ValueError(f"{quoted(value)} is not a duration (use e.g. 30s, 15m, 1h, 1d or seconds)")


def _bounded(value: timedelta | float) -> timedelta:
    # Compared as seconds first: timedelta() itself overflows on huge numbers.
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"a duration is at most {MAX_DURATION.days}d")
    return value if isinstance(value, timedelta) else timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


#: ``${VAR}`` in a value the loader substitutes before validation: the JSON Schema accepts it
#: wherever the YAML may hold a string that becomes a number, flag or choice once substituted.
ENV_REFERENCE_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*\}",
    "description": "${ENV_VAR}, replaced by the variable's value when the config loads",
}

#: What :func:`parse_duration` reads, in JSON Schema (ECMA 262) terms.
DURATION_PATTERN = r"^\s*(?=\S)(\d+d)?\s*(\d+h)?\s*(\d+m)?\s*(\d+s)?\s*$|^\s*\d+\s*$"

Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": DURATION_PATTERN},
                {"type": "number", "minimum": 0},
                ENV_REFERENCE_SCHEMA,
            ],
            "description": "a duration: seconds, or e.g. 30s, 15m, 1h, 1d",
        }
    ),
]


class AlsoAccepts:
    """JSON Schema marker for a type whose before-validator also takes another form (a role
    given by name alone): the schema offers both, as the validator does."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"anyOf": [self.schema, handler(core_schema)]}


def given(key: str) -> dict[str, Any]:
    """JSON Schema: ``key`` is there with a value; null and "" count as absent, as in the
    validators (a YAML ``key:`` with nothing after it is null)."""
    return {"required": [key], "properties": {key: {"not": {"enum": [None, ""]}}}}


def exactly_one_of(*keys: str) -> dict[str, Any]:
    """JSON Schema: exactly one of ``keys`` is given."""
    return {"oneOf": [given(k) for k in keys]}


def secret_pair_schema(key: str, *, required: bool = True) -> Callable[[dict[str, Any]], None]:
    """``json_schema_extra`` for a model with a :func:`resolve_secret` pair: ``key`` or
    ``key_file``, never both, one of them when ``required``."""
    file_key = f"{key}_file"

    def extra(schema: dict[str, Any]) -> None:
        # `key: null` beside `key_file` is read as absent, like a missing key.
        value = schema["properties"][key]
        if {"type": "null"} not in value.get("anyOf", []):
            schema["properties"][key] = {"anyOf": [value, {"type": "null"}]}
        required_keys = [k for k in schema.get("required", []) if k != key]
        if required_keys:
            schema["required"] = required_keys
        else:
            schema.pop("required", None)
        rule = (
            exactly_one_of(key, file_key)
            if required
            else {"not": {"allOf": [given(key), given(file_key)]}}
        )
        schema.setdefault("allOf", []).append(rule)

    return extra


def config_dir(info: ValidationInfo) -> Path:
    ctx = info.context if isinstance(info.context, dict) else {}
    base = ctx.get("base_dir")
    return Path(base) if base else Path.cwd()


def checking_files(info: ValidationInfo) -> bool:
    """Whether this load also checks the files a source's runs will open (a CSV drop, a CA
    bundle). `config check` does, to report what a run would reject; the other commands do
    not, so that one source's missing drop folder fails that source's runs (saying why) and
    does not stop `users list`, the daemon or the syncs of the other sources."""
    ctx = info.context if isinstance(info.context, dict) else {}
    return bool(ctx.get("check_files", True))


#: How much of a value given a message quotes.
SHOWN_VALUE = 40


def quoted(value: object) -> str:
    """A value as an error message quotes it: anything that looks like a secret scrubbed (a
    URL's password masked), cut to :data:`SHOWN_VALUE` characters."""
    text = scrub(str(value))
    if len(text) > SHOWN_VALUE:
        text = text[: SHOWN_VALUE - 1] + "…"
    return repr(text)


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    value = value.expanduser()
    return value if value.is_absolute() else (config_dir(info) / value)


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


def _find_secret_file(path: Path, original: Path) -> Path:
    """`x_file` may name a systemd credential: try $CREDENTIALS_DIRECTORY for bare names.

    A symbolic link counts as found even when what it points at is missing: the read then
    fails naming the link it tried, not a path it did not."""
    if _present(path):
        return path
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and not original.is_absolute():
        candidate = Path(creds) / original
        if _present(candidate):
            return candidate
    return path


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def read_secret_file(path: Path, original: Path | None = None) -> SecretStr:
    found = _find_secret_file(path, original or path)
    try:
        text = found.read_text(encoding="utf-8")
    except FileNotFoundError:
        if found.is_symlink():
            # A link's name is not the secret (a file of that name exists): say what it is.
            raise ValueError(
                f"cannot read secret file {found}: it is a symbolic link to "
                f"{found.readlink()}, which does not exist"
            ) from None
        # A name that names no file may be the secret itself, pasted in place of its path:
        # the message says where it was looked for, and the key and line say which.
        raise ValueError(
            "cannot read secret file: no such file (a relative name is looked up beside the "
            "config file, then in $CREDENTIALS_DIRECTORY; the name is not repeated here, in "
            "case it is the secret itself)"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read secret file {found}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        # The decoder's message quotes a byte of the secret; ours names the file only.
        raise ValueError(f"secret file {found} is not UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"secret file {found} is empty")
    if _more_than_one_line(text.strip()):
        raise ValueError(f"secret file {found} holds more than one line: {ONE_LINE}, alone in it")
    return SecretStr(text.strip())


#: Why a secret must be one line: each goes into an HTTP header or a login, where a line
#: break is refused (as a connection error, which would say nothing of the file).
ONE_LINE = "a secret is one line"


def _more_than_one_line(text: str) -> bool:
    return "\n" in text or "\r" in text


def _secret_file_readable(path: Path) -> Path:
    read_secret_file(path)
    return path


#: The ``x_file`` half of a secret pair. :func:`resolve_secret` has resolved and read it already;
#: checking it again here puts an unreadable file's error on this key's YAML path and line.
SecretFile = Annotated[Path, AfterValidator(_secret_file_readable)]


class _SecretProblem:
    """What :func:`resolve_secret` leaves in place of a secret it cannot settle: the
    :data:`Secret` field reports it on its own key, and the block's other keys are still
    validated (raising in the model's before-validator would hide their errors)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _report_secret_problem(value: Any) -> Any:
    if isinstance(value, _SecretProblem):
        raise ValueError(value.message)
    if isinstance(value, str) and _more_than_one_line(value.strip()):
        raise ValueError(f"holds more than one line: {ONE_LINE}")
    return value


#: The ``x`` half of a secret pair (see :func:`resolve_secret`).
Secret = Annotated[SecretStr, BeforeValidator(_report_secret_problem)]


def resolve_secret(data: Any, key: str, info: ValidationInfo, *, required: bool = True) -> Any:
    """Before-validator helper: turn ``key_file: PATH`` into ``key: <contents>``.

    Call it from a ``model_validator(mode="before")``, and declare ``key`` as :data:`Secret`
    and ``key_file`` as :data:`SecretFile`. Errors name the keys, never the value.
    """
    if not isinstance(data, dict):
        return data
    file_key = f"{key}_file"
    has_value = data.get(key) not in (None, "")
    has_file = data.get(file_key) not in (None, "")
    if has_value and has_file:
        return {**data, key: _SecretProblem(f"give {key} or {file_key}, not both")}
    if has_file:
        original = Path(str(data[file_key])).expanduser()
        path = original if original.is_absolute() else config_dir(info) / original
        data = dict(data)
        data[file_key] = _find_secret_file(path, original)
        try:
            data[key] = read_secret_file(data[file_key])
        except ValueError:
            # Reported by the SecretFile check on `key_file`, with that key's line; a
            # placeholder keeps `key` from being reported missing as well.
            data[key] = SecretStr("")
        return data
    if required and not has_value:
        return {**data, key: _SecretProblem(f"{key} or {file_key} is required")}
    return data


def secret_fields(key: str, description: str) -> dict[str, Any]:
    """Field defaults for a secret pair, so every model documents them the same way."""
    return {
        key: Field(default=None, description=f"{description} (or give {key}_file)"),
        f"{key}_file": Field(default=None, description=f"a file holding the {description}"),
    }


__all__ = [
    "ENV_REFERENCE_SCHEMA",
    "AlsoAccepts",
    "ConfigPath",
    "Duration",
    "Secret",
    "SecretFile",
    "SecretStr",
    "StrictModel",
    "checking_files",
    "exactly_one_of",
    "format_duration",
    "parse_duration",
    "read_secret_file",
    "resolve_secret",
    "secret_pair_schema",
]
