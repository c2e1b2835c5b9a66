"""The engine's side of a source's lease (see :mod:`rostersync.daemon.recovery`): take one for
a run, keep it renewed, hold it through the apply, give it back."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from rostersync.config.models import Settings
from rostersync.daemon import recovery
from rostersync.errors import RostersyncError
from rostersync.store.db import Store


class SourceBusy(RostersyncError):
    """Another process holds this source's lease."""


class LeaseLost(RostersyncError):
    """The source's lease was taken over while this run held it (its holder looked dead)."""


class LeaseHolder:
    """The engine's side of the source leases: take one for a run, keep it renewed, hold it
    through the apply, give it back."""

    settings: Settings
    store: Store
    owner: str
    log: Any
    interrupted_by: str
    _keepers: dict[str, recovery.LeaseKeeper]
    _registered: bool

    def _register(self) -> None:
        """Put this engine's owner in the instance registry (once), so that other processes
        can tell whether the holder of its leases still runs. The CLI and the daemon register
        it first, with their own kind."""
        if not self._registered:
            recovery.register(self.store, self.owner, "engine", keep_kind=True)
            self._registered = True

    def _take_lease(self, source: str) -> None:
        """Take the source's lease (see rostersync.daemon.recovery) and keep it renewed; a lease of
        a dead process of this host, or an expired one, is taken over and its run failed."""
        self._register()
        expire_after = self.settings.leases.expire_after
        try:
            with self.store.write() as conn:
                taken = recovery.take_lease(conn, source, self.owner, expire_after)
        except recovery.LeaseLocked:
            with self.store.read() as conn:
                holder = recovery.lease_holder(conn, source) or "another process"
            raise SourceBusy(f"source {source!r} is being synced by {holder}") from None
        if taken.holder != self.owner:
            raise SourceBusy(f"source {source!r} is being synced by {taken.holder}")
        log = self.log.bind(source=source)
        if taken.previous is not None:
            log.warning(
                "sync_lease_taken_over",
                previous_owner=taken.previous,
                reason=taken.reason,
                interrupted_runs=taken.interrupted,
            )
        elif taken.interrupted:
            log.warning("sync_orphans_interrupted", interrupted_runs=taken.interrupted)
        self._keepers[source] = recovery.LeaseKeeper(
            self.store, source, self.owner, expire_after, log
        ).start()

    def _drop_lease(self, source: str, error: str | None = None) -> None:
        """Give the lease back. A run of the source still `running` now was cut off: it is
        failed with ``error`` (default: this engine's ``interrupted_by``), its staging cleared."""
        keeper = self._keepers.pop(source, None)
        if keeper is not None:
            keeper.stop()  # before the lease row is locked below: it may be renewing it
        error = error or f"interrupted: {self.interrupted_by}"
        with self.store.write() as conn:
            lost = recovery.release_lease(conn, source, self.owner, error)
        if lost:
            self.log.warning("sync_interrupted", source=source, run_ids=lost, error=error)

    def _hold_lease(self, conn: Connection, source: str) -> None:
        """In the apply's transaction: go on only if the lease is still ours, and keep it
        (the row stays locked until the commit on PostgreSQL). A run whose lease was taken
        over has been failed by the taker; applying it now would apply a stale fetch."""
        if not recovery.hold_lease(conn, source, self.owner, self.settings.leases.expire_after):
            raise LeaseLost(
                f"interrupted: source {source!r} was taken over by another process before "
                "this run applied; nothing of it was applied"
            )
