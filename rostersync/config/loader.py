"""Load rostersync.yaml into :class:`Settings`, reporting every mistake at once.

Each issue names its dotted YAML path and line, e.g.
``sources.district.auth: line 14: client_secret or client_secret_file is required``.
Line numbers come from PyYAML's composed node tree, walked beside the loaded data.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Union
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, create_model
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from rostersync.config.messages import PathKey, kind_of, map_loc, message
from rostersync.config.models import Settings
from rostersync.config.types import ENV_REFERENCE_SCHEMA, format_duration, quoted
from rostersync.errors import ConfigError, ConfigIssue
from rostersync.logs import scrub
from rostersync.source.connector import PLUGIN_ERRORS, load_plugins

DEFAULT_CONFIG = Path("/etc/rostersync/rostersync.yaml")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """`--config`, else `$ROSTERSYNC_CONFIG`, else /etc/rostersync/rostersync.yaml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("ROSTERSYNC_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# -- YAML with line numbers -------------------------------------------------------------


def _walk(
    node: yaml.Node, path: PathKey, lines: dict[PathKey, int], issues: list[ConfigIssue]
) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key == "<<":
                continue
            child = (*path, key)
            if key in seen:
                issues.append(
                    ConfigIssue(dotted(child), "duplicate key", key_node.start_mark.line + 1)
                )
            seen.add(key)
            lines.setdefault(child, key_node.start_mark.line + 1)
            _walk(value_node, child, lines, issues)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), lines, issues)


@dataclasses.dataclass
class _FromEnv:
    """What ``${VAR}`` substitution put in the config: per dotted path, the text as written
    and as substituted; and every variable's value by its reference. Error messages show the
    reference, never the value: a variable may hold a secret, and a message that quotes the
    value at the wrong key (a token pasted in ``base_url``'s variable) would print it."""

    written: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    values: dict[str, str] = dataclasses.field(default_factory=dict)

    def hide(self, issue: ConfigIssue) -> ConfigIssue:
        """``issue`` with every substituted value it quotes shown as its reference, and
        anything else that looks like a secret scrubbed."""
        text = issue.message
        written = self.written.get(issue.path)
        if written is not None and written[1]:
            raw, value = written
            ref = f"the value of {raw}" if _ENV.fullmatch(raw) else repr(raw)
            text = text.replace(repr(value), ref).replace(quoted(value), ref)
        # Longest first: a value inside another is replaced within it last.
        for ref, value in sorted(self.values.items(), key=lambda kv: -len(kv[1])):
            if len(value) >= HIDDEN_VALUE_MIN:
                text = text.replace(value, ref)
        # Whatever a message quotes whole (a URL with its password) is scrubbed as a log is.
        text = scrub(text)
        return issue if text == issue.message else dataclasses.replace(issue, message=text)


#: Values of variables at least this long are replaced by their reference wherever an error
#: message quotes them; shorter ones (a port, a flag) only where the message quotes the whole
#: value of their key, as a shorter text may also be part of the message's own words.
HIDDEN_VALUE_MIN = 6


def _substitute_env(
    data: Any, path: PathKey, issues: list[ConfigIssue], env: _FromEnv | None = None
) -> Any:
    """Replace ``${VAR}`` in every string; an unset variable is an issue, not an empty string.
    ``env`` collects what was substituted where (:class:`_FromEnv`)."""
    if isinstance(data, dict):
        return {k: _substitute_env(v, (*path, str(k)), issues, env) for k, v in data.items()}
    if isinstance(data, list):
        return [_substitute_env(v, (*path, i), issues, env) for i, v in enumerate(data)]
    if isinstance(data, str) and "${" in data:

        def repl(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                issues.append(
                    ConfigIssue(dotted(path), f"environment variable {m.group(1)} is not set")
                )
                return ""
            if env is not None:
                env.values[m.group(0)] = value
            return value

        substituted = _ENV.sub(repl, data)
        if env is not None and substituted != data:
            env.written[dotted(path)] = (data, substituted)
        return substituted
    return data


# -- the line of a YAML path ------------------------------------------------------------


def _line_for(path: PathKey, lines: Mapping[PathKey, int]) -> int | None:
    p = path
    while p:
        if p in lines:
            return lines[p]
        p = p[:-1]
    return None


# -- the model with every installed source type -----------------------------------------


@functools.cache
def settings_model(plugin_types: tuple[str, ...] | None = None) -> type[Settings]:
    """Settings whose `sources` values are a union of the installed connectors' models, or
    of those of ``plugin_types`` where each is installed (see load_plugins)."""
    plugins = load_plugins(plugin_types)
    models = [p.config_model for p in plugins.values()]
    if not models:
        return Settings
    union: Any = models[0] if len(models) == 1 else Union[tuple(models)]  # noqa: UP007
    source_type: Any = Annotated[union, Field(discriminator="type")] if len(models) > 1 else union
    return create_model(
        "RostersyncConfig",
        __base__=Settings,
        sources=(
            dict[str, source_type],
            Field(
                default_factory=dict,
                json_schema_extra={"propertyNames": {"pattern": _SOURCE_NAME.pattern}},
            ),
        ),
    )


class _ConfigJsonSchema(GenerateJsonSchema):
    """The schema of the YAML as written, before the loader substitutes ``${VAR}``: a number,
    flag or choice may be given as an environment reference, and durations show as ``30s``."""

    def int_schema(self, schema: core_schema.IntSchema) -> JsonSchemaValue:
        return _or_env(super().int_schema(schema))

    def float_schema(self, schema: core_schema.FloatSchema) -> JsonSchemaValue:
        return _or_env(super().float_schema(schema))

    def bool_schema(self, schema: core_schema.BoolSchema) -> JsonSchemaValue:
        return _or_env(super().bool_schema(schema))

    def literal_schema(self, schema: core_schema.LiteralSchema) -> JsonSchemaValue:
        generated = super().literal_schema(schema)
        # A single value is a union's tag (`type: oneroster`): it must stay a plain constant.
        return generated if len(schema["expected"]) == 1 else _or_env(generated)

    def encode_default(self, dft: Any) -> Any:
        if isinstance(dft, timedelta):
            return format_duration(dft)
        return super().encode_default(dft)


def _or_env(schema: JsonSchemaValue) -> JsonSchemaValue:
    return {"anyOf": [schema, ENV_REFERENCE_SCHEMA]}


def json_schema() -> dict[str, Any]:
    schema = settings_model().model_json_schema(by_alias=True, schema_generator=_ConfigJsonSchema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "rostersync configuration"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


# -- cross-field checks pydantic cannot see -----------------------------------------------


def _semantic_issues(data: Mapping[str, Any]) -> list[ConfigIssue]:
    """Cross-field rules, checked on the raw data so they are reported even when other keys
    fail validation (an admin fixes every mistake in one pass)."""
    issues: list[ConfigIssue] = []
    raw_roles = data.get("roles")
    names: list[str] = []
    if isinstance(raw_roles, list):
        for i, r in enumerate(raw_roles):
            name = r.get("name") if isinstance(r, dict) else r
            if isinstance(name, str):
                if name in names:
                    issues.append(
                        ConfigIssue(f"roles[{i}]", f"role {quoted(name)} is listed twice")
                    )
                names.append(name)
    raw_sites = data.get("sites")
    sites = [s for s in raw_sites if _good_site(s)] if isinstance(raw_sites, list) else []
    # A sites value with no name to read (not a list, or no valid entry) is reported where it
    # is written; default_site and site_map checked against it would be blamed, with "(none)".
    sites_usable = "sites" not in data or (isinstance(raw_sites, list) and (sites or not raw_sites))
    for i, site in enumerate(sites):
        if site in sites[:i]:
            issues.append(ConfigIssue(f"sites[{i}]", f"site {quoted(site)} is listed twice"))
    prov = data.get("provisioning")
    if isinstance(prov, dict):
        role = prov.get("default_role")
        if isinstance(role, str) and names and role not in names:
            issues.append(
                ConfigIssue(
                    "provisioning.default_role",
                    f"{quoted(role)} is not one of roles ({', '.join(names)})",
                )
            )
        default_site = prov.get("default_site")
        if sites_usable and isinstance(default_site, str) and default_site not in sites:
            issues.append(
                ConfigIssue(
                    "provisioning.default_site",
                    f"{quoted(default_site)} is not one of sites ({', '.join(sites) or 'none'})",
                )
            )
        site_map = prov.get("site_map")
        if sites_usable and isinstance(site_map, dict):
            for key, value in site_map.items():
                if isinstance(value, str) and value not in sites:
                    issues.append(
                        ConfigIssue(
                            f"provisioning.site_map.{key}", f"{quoted(value)} is not one of sites"
                        )
                    )
    sources = data.get("sources")
    if isinstance(sources, dict):
        known = load_plugins(_source_types(data))
        for name in sources:
            if not _SOURCE_NAME.match(str(name)):
                issues.append(
                    ConfigIssue(
                        f"sources.{name}",
                        "source names use letters, digits, '_', '-' and '.' (at most 64)",
                    )
                )
            src = sources[name]
            kind = src.get("type") if isinstance(src, dict) else None
            if isinstance(kind, str) and kind not in known and kind in PLUGIN_ERRORS:
                issues.append(
                    ConfigIssue(
                        f"sources.{name}.type",
                        f"the {kind} connector failed to load: {PLUGIN_ERRORS[kind]}",
                    )
                )
    db = data.get("database")
    if isinstance(db, str) and (problem := _database_problem(db)) is not None:
        issues.append(ConfigIssue("database", problem))
    return issues


def _good_site(value: object) -> bool:
    """A site name the model accepts (Settings._site_names)."""
    return isinstance(value, str) and bool(value.strip()) and len(value) <= 50


def _database_problem(url: str) -> str | None:
    """What is wrong with a ``database`` URL that SQLAlchemy would only find when a command
    opens it (as an internal error): another scheme, a SQLite URL with a host part
    (``sqlite://file.db``, two slashes), or none with no file (``sqlite:///``, an in-memory
    database that every connection would see empty); for PostgreSQL, a driver other than
    psycopg 3, a port that is not a number, or psycopg not installed."""
    if url.startswith("postgresql"):
        return _postgresql_problem(url)
    if not url.startswith("sqlite:"):
        return "use sqlite:///PATH or postgresql+psycopg://user@host/db"
    if not url.startswith("sqlite:///"):
        return (
            f"{quoted(url)}: a SQLite URL has three slashes before a relative path (sqlite:///PATH)"
        )
    path = url[len("sqlite:///") :].partition("?")[0]
    if not path or path == ":memory:":
        return "a SQLite database needs a file: sqlite:///PATH (an in-memory one keeps nothing)"
    return None


def _driver_installed() -> bool:
    """Whether psycopg, PostgreSQL's driver (the ``postgres`` extra), can be imported."""
    return importlib.util.find_spec("psycopg") is not None


def _postgresql_problem(url: str) -> str | None:
    scheme = url.partition("://")[0]
    if scheme.partition("+")[2] not in ("", "psycopg"):
        return (
            f"{quoted(scheme)}: rostersync reaches PostgreSQL through psycopg 3 "
            "(postgresql+psycopg://user@host/db)"
        )
    try:
        port = urlsplit(url).port
    except ValueError:
        port = 0
    if port == 0:
        return "the port is not a number from 1 to 65535 (postgresql+psycopg://user@host:5432/db)"
    if not _driver_installed():
        return "PostgreSQL's driver, psycopg, is not installed: pip install 'rostersync[postgres]'"
    return None


def _resolve_database(url: str, base: Path) -> str:
    """`sqlite:///relative.db` is relative to the config folder, like every other path;
    ``postgresql://`` names psycopg 3, the one PostgreSQL driver rostersync uses (SQLAlchemy
    would take psycopg2 for it)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and ":memory:" not in url:
        rel = url[len(prefix) :]
        if rel and not Path(rel).is_absolute():
            return prefix + str((base / rel).resolve())
    return url


def load_settings_text(
    text: str, *, file: str = "<config>", base_dir: Path | None = None, check_files: bool = True
) -> Settings:
    """Parse and validate a config. ``check_files``: also check the files sources' runs open
    (see :func:`rostersync.config.types.checking_files`)."""
    base = base_dir or Path.cwd()
    issues: list[ConfigIssue] = []
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        # Where the parser gave up is often lines after the mistake (an unclosed [ or {):
        # say where what it was reading began.
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start is not None and (mark is None or start.line != mark.line):
            problem = f"{problem} ({context} that starts on line {start.line + 1})"
        problem = _explained(problem, text, mark)
        raise ConfigError([ConfigIssue("", f"YAML syntax: {problem}", line)], file) from None
    if data is None:
        raise ConfigError([ConfigIssue("", "the file is empty")], file)
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else kind_of(data)
        raise ConfigError(
            [ConfigIssue("", f"the file must be a YAML mapping of keys (key: value), not {kind}")],
            file,
        )
    lines: dict[PathKey, int] = {}
    if node is not None:
        _walk(node, (), lines, issues)
    found = len(issues)
    env = _FromEnv()
    data = _substitute_env(data, (), issues, env)
    # An unset variable is reported once, with its line: what validating the empty value
    # would add at the same key ("at least 1 character", "'' is not a duration") is not news.
    unset = {i.path for i in issues[found:]}
    issues[found:] = [
        dataclasses.replace(i, line=_line_for(_path_key(i.path), lines)) for i in issues[found:]
    ]

    model = settings_model(_source_types(data))
    settings: Settings | None = None
    try:
        settings = model.model_validate(
            data, context={"base_dir": base, "check_files": check_files}
        )
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            # Only a "missing" error ends in an absent key; otherwise a trailing segment that
            # is not in the data is a union tag ("oauth1") and no part of the message.
            path, missing = map_loc(
                tuple(err["loc"]), data, missing_key=err.get("type") == "missing"
            )
            if dotted(path) in unset:
                continue
            issues.append(
                ConfigIssue(dotted(path), message(err, missing, model), _line_for(path, lines))
            )
    for issue in _semantic_issues(data):
        if issue.path in unset:
            continue
        issues.append(
            ConfigIssue(issue.path, issue.message, _line_for(_path_key(issue.path), lines))
        )
    # Issues found twice (a env var used in two places) are reported once, in file order.
    unique = list(dict.fromkeys(env.hide(i) for i in issues))
    unique.sort(key=lambda i: (i.line or 0, i.path))
    if unique or settings is None:
        raise ConfigError(unique, file)
    return settings.model_copy(update={"database": _resolve_database(settings.database, base)})


def _explained(problem: str, text: str, mark: yaml.Mark | None) -> str:
    """PyYAML's ``problem``, explained for the two mistakes its wording hides best: a tab
    (a "character that cannot start any token") and an unquoted ``${VAR}`` inside ``[...]``
    or ``{...}``, whose ``{`` opens a mapping."""
    if mark is None:
        return problem
    lines = text.splitlines()
    source = lines[mark.line] if mark.line < len(lines) else ""
    if source[mark.column : mark.column + 1] == "\t":
        return (
            f"a tab (column {mark.column + 1}): YAML indents and separates with spaces, never tabs"
        )
    if re.search(r"[\[{][^\]}]*(?<![\"'])\$\{", source):
        return f'{problem}; quote a ${{VAR}} inside [...] or {{...}}: "${{VAR}}"'
    return problem


def _source_types(data: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The source types the config names, when every source names one; else None (all)."""
    sources = data.get("sources")
    if not isinstance(sources, dict) or not sources:
        return None
    types = [s.get("type") if isinstance(s, dict) else None for s in sources.values()]
    if not all(isinstance(t, str) for t in types):
        return None
    return tuple(sorted({str(t) for t in types}))


def _path_key(path: str) -> PathKey:
    out: list[str | int] = []
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        out.append(int(part[1:-1]) if part.startswith("[") else part)
    return tuple(out)


_WHICH_CONFIG = " (the default: give --config PATH or set ROSTERSYNC_CONFIG)"
_FROM_ENV = " (named by $ROSTERSYNC_CONFIG: correct it, or give --config PATH)"


def load_settings(
    path: str | os.PathLike[str] | None = None, *, check_files: bool = False
) -> Settings:
    """Read and validate the config file; raises ConfigError listing every issue.

    ``check_files``: also check each source's drop folder and CA bundle, as `config check`
    does; other commands leave those to the source's runs (see :func:`file_problems`)."""
    file = config_path(path)
    try:
        data = file.read_bytes()
        text = data.decode("utf-8")
    except OSError as exc:
        # Not named on the command line: say where the name came from, and how to give one.
        if path:
            hint = ""
        elif os.environ.get("ROSTERSYNC_CONFIG"):
            hint = _FROM_ENV
        else:
            hint = _WHICH_CONFIG
        raise ConfigError(
            [ConfigIssue("", f"cannot read config file: {exc.strerror or exc}{hint}")], str(file)
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([_not_utf8(data, exc)], str(file)) from None
    return load_settings_text(
        text, file=str(file), base_dir=file.resolve().parent, check_files=check_files
    )


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> ConfigIssue:
    """A config file that is not UTF-8 (one saved as UTF-16 or Windows-1252): the line and
    byte where decoding stopped."""
    line = data.count(b"\n", 0, exc.start) + 1
    byte = data[exc.start : exc.start + 1].hex()
    return ConfigIssue("", f"the file is not UTF-8 (byte 0x{byte}): save it as UTF-8", line=line)


def file_problems(path: str | os.PathLike[str] | None = None) -> list[str]:
    """What `config check` would add to a config that loads: the files sources' runs would
    fail to open, for the daemon to warn about at start and on reload."""
    try:
        load_settings(path, check_files=True)
    except ConfigError as exc:
        return [str(issue) for issue in exc.issues]
    return []
