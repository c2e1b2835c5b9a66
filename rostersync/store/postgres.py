"""How PostgreSQL connections are opened and set up: the driver's arguments besides the URL's,
and what each new connection is given before the store uses it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, event

#: Seconds a PostgreSQL connection attempt may take, unless the URL says
#: (``?connect_timeout=N``): a server behind a firewall that drops packets otherwise holds a
#: command (`status`, a scheduled sync) for the system's TCP timeout, minutes, without a word.
CONNECT_TIMEOUT_S = 10


def postgresql_connect_args(query: Mapping[str, Any]) -> dict[str, Any]:
    """The driver's connection arguments besides the URL's: the connect timeout, when the URL
    gives none (psycopg reads the URL's own)."""
    return {} if "connect_timeout" in query else {"connect_timeout": CONNECT_TIMEOUT_S}


#: Seconds a command that only reads (`status`, `runs list`) waits for a lock another
#: session holds against reads (`VACUUM FULL`, `ALTER TABLE`, `LOCK TABLE`; a first sync's
#: apply holds one on the mirror's tables, sync.merge), then says so, where it waited
#: without end.
READ_LOCK_WAIT_S = 60.0
#: PostgreSQL's SQLSTATE for a lock not granted within ``lock_timeout``.
LOCK_NOT_AVAILABLE = "55P03"


def postgresql_setup(engine: Engine, *, reader: bool = False) -> None:
    """Settings every connection of the engine takes when it opens; ``reader``: the engine of
    a command that only reads, which waits for a lock at most ``READ_LOCK_WAIT_S``."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # No JIT compilation: the planner's costs for the sync's probes per row (fenced
        # subqueries) pass jit_above_cost at a district's size, and compiling took longer
        # than those queries run. A SET, not a startup option, which PgBouncer refuses.
        with dbapi_conn.cursor() as cur:
            cur.execute("SET jit = off")
            if reader:
                cur.execute(f"SET lock_timeout = {int(READ_LOCK_WAIT_S * 1000)}")
        dbapi_conn.commit()
