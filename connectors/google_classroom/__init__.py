"""Google Classroom as a roster source (``type: google_classroom``).

A service account with domain-wide delegation reads every course and every page of each
course's teachers and students as ``delegated_admin``, within a client-side quota. See
:mod:`.connector` for how courses map onto classes, persons and enrollments.
"""

from __future__ import annotations

from connectors.google_classroom.auth import SCOPES, ServiceAccountAuth
from connectors.google_classroom.config import (
    GoogleClassroomSourceConfig,
    QuotaSettings,
    ServiceAccountKey,
)
from connectors.google_classroom.connector import (
    NO_EMAIL_REASON,
    GoogleClassroomConnector,
    create,
)
from connectors.google_classroom.quota import QuotaLimiter, TokenBucket
from rostersync.connector import ConnectorPlugin

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
