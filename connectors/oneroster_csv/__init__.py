"""``type: oneroster_csv``: a OneRoster 1.1 bulk CSV drop, in a folder or a ``.zip``.

One module per concern: :mod:`.files` finds the drop's files and reads their rows with the
line each starts on; :mod:`.manifest` decides which files are read; :mod:`.entities` turns rows
into records; :mod:`.connector` is the connector itself, its config and its plug-in.
"""

from connectors.oneroster_csv.connector import (
    PLUGIN,
    CsvSourceConfig,
    OneRosterCsvConnector,
    create,
)

__all__ = ["PLUGIN", "CsvSourceConfig", "OneRosterCsvConnector", "create"]
