"""The long-running process: service (lifecycle, reload), schedule, workers, recovery, procs,
metrics and systemd.

Deliberately empty: the sync engine imports :mod:`rostersync.daemon.recovery` and a connector
imports :mod:`rostersync.daemon.procs`, and neither should pay for the scheduler's imports.
"""
