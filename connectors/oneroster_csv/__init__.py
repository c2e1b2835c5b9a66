"""``type: oneroster_csv``: a OneRoster 1.1 or 1.2 CSV drop, bulk or delta, in a folder or a
``.zip``.

One module per concern:

* :mod:`.files` finds the drop's files and reads their rows, each with the line it starts on;
* :mod:`.manifest` reads the version and each file's mode (bulk, delta, absent), and checks
  every file's header before any row is read, reporting all problems at once;
* :mod:`.entities` turns rows into records (the rules of each value, what is rejected and
  what is only a warning);
* :mod:`.roles` gives OneRoster 1.2 people their roles from ``roles.csv``;
* :mod:`.sessions` reads ``academicSessions.csv`` (for the terms rules);
* :mod:`.notes` collects the warnings a run reports;
* :mod:`.connector` is the connector (what a full or delta run does with each kind of drop),
  its config and its plug-in.
"""

from connectors.oneroster_csv.connector import (
    PLUGIN,
    CsvSourceConfig,
    OneRosterCsvConnector,
    create,
)
from rostersync.source.records import AcademicSession

__all__ = ["PLUGIN", "AcademicSession", "CsvSourceConfig", "OneRosterCsvConnector", "create"]
