"""What the command line imports: `--help` and light commands load nothing heavy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.cli.sample import run

#: What a light command must not pay for: database, migrations, HTTP, spreadsheets, crypto.
_HEAVY = ("sqlalchemy", "sqlmodel", "alembic", "psycopg", "httpx", "openpyxl", "cryptography")
_IMPORTED = """
import sys
from rostersync.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})), file=sys.stderr)
"""


def _top_level_imports(*args: str, cwd: Path, program: str = _IMPORTED) -> set[str]:
    """The top-level packages a fresh interpreter has imported after running the command."""
    done = subprocess.run(
        [sys.executable, "-c", program, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(done.stderr.split())


def test_help_imports_no_database_http_or_spreadsheet_module(tmp_path: Path) -> None:
    """`rostersync --help` loads click and a few small modules of ours, nothing heavy."""
    loaded = _top_level_imports("--help", cwd=tmp_path)
    assert "click" in loaded
    assert not loaded & {*_HEAVY, "pydantic", "yaml", "structlog", "asyncio"}


def test_users_list_imports_no_orm_migrations_or_http(config: Path) -> None:
    """`users list` opens the database with SQLAlchemy Core, and needs no ORM tables, Alembic,
    HTTP client or spreadsheet reader (the connector plug-ins load without them)."""
    assert run(config, "db", "upgrade").exit_code == 0
    loaded = _top_level_imports("--config", str(config), "users", "list", cwd=config.parent)
    assert "sqlalchemy" in loaded
    assert not loaded & (set(_HEAVY) - {"sqlalchemy"})


def test_a_first_sync_on_sqlite_loads_neither_alembic_nor_the_postgresql_dialect(
    config: Path,
) -> None:
    """A sync on a new SQLite database sets it up from the schema snapshot, without Alembic,
    and loads no PostgreSQL module (SQLAlchemy's dialect alone is 12-27 ms of start-up)."""
    program = _IMPORTED.replace(
        '{m.split(".")[0] for m in sys.modules}',
        '{m for m in sys.modules if m.startswith(("alembic", "sqlalchemy.dialects", "psycopg"))}',
    )
    loaded = _top_level_imports(
        "--config", str(config), "sync", "--full", cwd=config.parent, program=program
    )
    assert "sqlalchemy.dialects.sqlite" in loaded
    assert not {m for m in loaded if m.startswith(("alembic", "psycopg"))}
    assert not {m for m in loaded if m.startswith("sqlalchemy.dialects.postgresql")}
    done = run(config, "runs", "list", "--json")
    assert done.exit_code == 0 and '"succeeded' in done.output
