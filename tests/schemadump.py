"""A database's schema as comparable data: what two databases of one backend must share to
be set up alike (tests of the schema snapshots and of the bulk load's key and indexes)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text


def schema_of(conn: Connection) -> dict[str, Any]:
    """What a database's schema is, comparable between two databases of one backend."""
    versions = sorted(r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version")))
    if conn.dialect.name == "sqlite":
        rows = conn.execute(
            text("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")
        )
        return {"objects": [tuple(r) for r in rows], "versions": versions}
    here = "n.nspname = current_schema()"
    columns = conn.execute(
        text(
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, "
            "pg_get_expr(d.adbin, d.adrelid), a.attgenerated, a.attnum "
            "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
            f"WHERE {here} AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind = 'r' "
            "ORDER BY c.relname, a.attnum"
        )
    )
    tables = conn.execute(
        text(
            "SELECT c.relname, c.relkind, c.relpersistence, "
            "array_to_string(c.reloptions, ',') FROM pg_class c "
            f"JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {here} ORDER BY c.relname"
        )
    )
    constraints = conn.execute(
        text(
            "SELECT c.relname, k.conname, pg_get_constraintdef(k.oid) FROM pg_constraint k "
            "JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE {here} ORDER BY c.relname, k.conname"
        )
    )
    indexes = conn.execute(
        text(
            "SELECT tablename, indexname, replace(indexdef, schemaname || '.', '') "
            "FROM pg_indexes WHERE schemaname = current_schema() ORDER BY tablename, indexname"
        )
    )
    return {
        "columns": [tuple(r) for r in columns],
        "tables": [tuple(r) for r in tables],
        "constraints": [tuple(r) for r in constraints],
        "indexes": [tuple(r) for r in indexes],
        "versions": versions,
    }
