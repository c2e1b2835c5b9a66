"""Google Classroom as a roster source (``type: google_classroom``).

A service account with domain-wide delegation reads every course and every page of each
course's teachers and students as ``delegated_admin``, within a client-side quota. See
:mod:`.connector` for how courses map onto classes, persons and enrollments.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from connectors.google_classroom.config import (
    GoogleClassroomSourceConfig,
    QuotaSettings,
    ServiceAccountKey,
)
from rostersync.source.connector import ConnectorContext, ConnectorPlugin

if TYPE_CHECKING:
    from connectors.google_classroom.auth import SCOPES, ServiceAccountAuth
    from connectors.google_classroom.connector import NO_EMAIL_REASON, GoogleClassroomConnector
    from connectors.google_classroom.quota import QuotaLimiter, TokenBucket

#: The public names whose modules are imported on first use (see create), by module.
_LAZY = {
    "SCOPES": "auth",
    "ServiceAccountAuth": "auth",
    "NO_EMAIL_REASON": "connector",
    "GoogleClassroomConnector": "connector",
    "QuotaLimiter": "quota",
    "TokenBucket": "quota",
}


def create(ctx: ConnectorContext) -> GoogleClassroomConnector:
    """The connector, imported on first use: every command loads the plug-in to read the
    config, and most never fetch (the HTTP client and the token signing cost their start-up)."""
    from connectors.google_classroom.connector import create as create_connector

    return create_connector(ctx)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PLUGIN = ConnectorPlugin(
    type="google_classroom",
    config_model=GoogleClassroomSourceConfig,
    create=create,
    description="Google Classroom courses and rosters via a service account (read-only)",
)

__all__ = [
    "NO_EMAIL_REASON",
    "PLUGIN",
    "SCOPES",
    "GoogleClassroomConnector",
    "GoogleClassroomSourceConfig",
    "QuotaLimiter",
    "QuotaSettings",
    "ServiceAccountAuth",
    "ServiceAccountKey",
    "TokenBucket",
]
