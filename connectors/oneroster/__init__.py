"""OneRoster 1.1/1.2 REST: ClassLink Roster Server and other providers (`type: oneroster`).

Modules: :mod:`.config` (the source keys), :mod:`.auth` (OAuth1 HMAC-SHA256, OAuth2 client
credentials, bearer), :mod:`.paging` (offset/limit, ``X-Total-Count``, ``Link``),
:mod:`.normalize` (1.1/1.2 JSON to records), :mod:`.errors` (HTTP outcomes to source errors),
:mod:`.connector` (the connector itself).
"""

from __future__ import annotations

from connectors.oneroster.config import OneRosterSourceConfig
from connectors.oneroster.connector import OneRosterConnector
from rostersync.connector import ConnectorPlugin

PLUGIN = ConnectorPlugin(
    type="oneroster",
    config_model=OneRosterSourceConfig,
    create=OneRosterConnector,
    description="OneRoster 1.1/1.2 REST (ClassLink Roster Server and other providers)",
)

__all__ = ["PLUGIN", "OneRosterConnector", "OneRosterSourceConfig"]
