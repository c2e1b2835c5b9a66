"""OneRoster 1.1/1.2 REST: ClassLink Roster Server and other providers (`type: oneroster`).

Modules: :mod:`.config` (the source keys), :mod:`.auth` (OAuth1 HMAC-SHA256, OAuth2 client
credentials, bearer), :mod:`.paging` (offset/limit, ``X-Total-Count``, ``Link``),
:mod:`.normalize` (1.1/1.2 JSON to records), :mod:`.errors` (HTTP outcomes to source errors),
:mod:`.connector` (the connector itself).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connectors.oneroster.config import OneRosterSourceConfig
from rostersync.source.connector import ConnectorContext, ConnectorPlugin

if TYPE_CHECKING:
    from connectors.oneroster.connector import OneRosterConnector


def create(ctx: ConnectorContext) -> OneRosterConnector:
    """The connector, imported on first use: every command loads the plug-in to read the
    config, and most never fetch (the HTTP client, auth and decoders cost their start-up)."""
    from connectors.oneroster.connector import OneRosterConnector

    return OneRosterConnector(ctx)


def __getattr__(name: str) -> Any:
    if name == "OneRosterConnector":  # the public name, imported on first use (see create)
        from connectors.oneroster.connector import OneRosterConnector

        return OneRosterConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PLUGIN = ConnectorPlugin(
    type="oneroster",
    config_model=OneRosterSourceConfig,
    create=create,
    description="OneRoster 1.1/1.2 REST (ClassLink Roster Server and other providers)",
)

__all__ = ["PLUGIN", "OneRosterConnector", "OneRosterSourceConfig"]
