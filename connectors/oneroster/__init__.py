"""OneRoster 1.1/1.2 REST: ClassLink Roster Server and other providers (`type: oneroster`).

Modules: :mod:`.config` (the source keys), :mod:`.auth` (OAuth1 HMAC-SHA256, OAuth2 client
credentials, bearer), :mod:`.paging` (offset/limit, ``X-Total-Count``, ``Link``),
:mod:`.normalize` (1.1/1.2 JSON to records), :mod:`.errors` (HTTP outcomes to source errors),
:mod:`.connector` (the connector itself).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connectors.oneroster.config import OneRosterSourceConfig
    from connectors.oneroster.connector import OneRosterConnector
    from rostersync.source.connector import ConnectorContext, ConnectorPlugin


def create(ctx: ConnectorContext) -> OneRosterConnector:
    """The connector, imported on first use: every command loads the plug-in to read the
    config, and most never fetch (the HTTP client, auth and decoders cost their start-up)."""
    from connectors.oneroster.connector import OneRosterConnector

    return OneRosterConnector(ctx)


def _plugin() -> ConnectorPlugin:
    from connectors.oneroster.config import OneRosterSourceConfig
    from rostersync.source.connector import ConnectorPlugin

    return ConnectorPlugin(
        type="oneroster",
        config_model=OneRosterSourceConfig,
        create=create,
        description="OneRoster 1.1/1.2 REST (ClassLink Roster Server and other providers)",
    )


def __getattr__(name: str) -> Any:
    """The package's names, each imported on first use: the decode workers import
    :mod:`connectors.oneroster.decode`, and with it this package, and need neither the
    config models (pydantic) nor the HTTP client (see create)."""
    if name == "OneRosterConnector":
        from connectors.oneroster.connector import OneRosterConnector

        return OneRosterConnector
    if name == "OneRosterSourceConfig":
        from connectors.oneroster.config import OneRosterSourceConfig

        return OneRosterSourceConfig
    if name == "PLUGIN":
        plugin = globals()["PLUGIN"] = _plugin()  # one plug-in object, as an import gives
        return plugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PLUGIN", "OneRosterConnector", "OneRosterSourceConfig"]
