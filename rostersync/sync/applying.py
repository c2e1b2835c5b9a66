"""The apply step of a run: what changed is merged, provisioning decided and carried out, and
the resyncs queued, all in one transaction.

The step is thin glue around :mod:`rostersync.sync.rules` (rules), the SQL of
:mod:`~rostersync.sync.detect`, :mod:`~rostersync.sync.merge` and
:mod:`~rostersync.sync.provisioning`, and :mod:`rostersync.resync.groups` (for a held or dry
run's change set).

Rollback by exception, the engine's key invariant: the apply writes the directory and the
mirror only inside one ``store.write()`` transaction, and a held or dry run undoes all of it by
raising :class:`_RollBack` inside that transaction (never by deleting what it wrote). Its
findings travel out with the exception and are recorded with the run alone, in a second
transaction. So nothing inside the apply may commit, open its own transaction, or catch and
swallow :class:`_RollBack`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from rostersync.config.models import Settings
from rostersync.daemon import recovery
from rostersync.emails import normalize_email
from rostersync.resync.groups import follow_classes, kept_by_import, mark_dirty, rebuild_groups
from rostersync.resync.members import stamp_updated, update_members
from rostersync.resync.queue import pending_users, queue_resync, queued_jobs
from rostersync.source.records import Rejected
from rostersync.store.db import Store, as_utc, lock_directory, utcnow
from rostersync.sync import changes as changeset
from rostersync.sync import dangling, detect, provisioning, runs
from rostersync.sync import merge as merging
from rostersync.sync import repeats as repeated
from rostersync.sync.repeats import Repeats
from rostersync.sync.rules import ProvisionPlan, check_safety, email_rejection, plan_provisioning
from rostersync.sync.runs import (
    Outcome,
    RunContext,
    RunReport,
    empty_counts,
    load_report,
    record_outcome,
    source_rejections,
    source_state,
)
from rostersync.sync.scope import SCOPE_COUNT_KEYS, fingerprint_of, last_counts, ratio_counts
from rostersync.sync.staging import clear_staging, prepare_staging


@dataclass
class _Merged:
    """What the apply's merge found (see :meth:`SyncEngine._merge_changes`)."""

    grouped: dict[str, int]
    changes: detect.Changes
    #: dirty classes whose members alone changed: the sync updates those members itself
    members_only: set[str]
    #: the other dirty classes, whose groups the resyncs rebuild
    dirty: set[str]
    #: the persons whose eligibility the changes may concern
    affected_people: set[str]
    #: groups whose removal waiting resync jobs of an earlier run carry out, found before
    #: the merge (provisioning.removals_pending): not this run's to count
    pending_removals: set[str]
    #: enrollments the run wrote or left behind that name a person or class not in the mirror
    orphans: dangling.Dangling


@dataclass
class _Decision:
    """The apply's provisioning decision (see :meth:`SyncEngine._decide`)."""

    state: Mapping[str, Any] | None
    decided_with: str
    settings_changed: bool
    redecide: bool
    #: the persons decided for, None for all of the source
    only: set[str] | None
    plan: ProvisionPlan
    outcome: Outcome
    groups_removed: int = 0


class _RollBack(Exception):
    """Raised inside the apply's transaction to undo all of it (a held or a dry run); the
    :class:`Outcome` travels with it to the report. ``store.write()`` rolls back on any
    exception, so this must reach it: see "rollback by exception" in the module docstring."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


def _shared_email_warnings(conn: Connection, source: str, plan: ProvisionPlan) -> list[str]:
    """One warning per email that several persons of the source share after this run: they
    map to one account, and an admin should see every such merge."""
    people: dict[str, dict[str, str]] = {
        email: {t.sourced_id: t.display_name for t in teachers}
        for email, teachers in plan.shared.items()
    }
    linked_before = provisioning.source_identities(
        conn, source, {link.user_id for link in plan.link}
    )
    for link in plan.link:
        others = linked_before.get(link.user_id, [])
        if others:
            merged = people.setdefault(link.email, {})
            merged.update(others)
            merged.setdefault(link.sourced_id, link.display_name)
    out = []
    for email, who in sorted(people.items()):
        if len(who) > 1:
            named = ", ".join(f"{sid} ({name or 'no name'})" for sid, name in sorted(who.items()))
            out.append(
                f"email {email} is shared by {len(who)} persons of the source, who map to one "
                f"account: {named}"
            )
    return out


class Applier:
    """The engine's apply step."""

    settings: Settings
    store: Store

    def _hold_lease(self, conn: Connection, source: str) -> None:
        raise NotImplementedError

    def _apply(self, ctx: RunContext) -> RunReport:
        """Apply a fetched run in one transaction. A held or dry run raises :class:`_RollBack`
        inside it, so that everything it wrote is undone (the engine's key invariant: the
        directory and the mirror change only when the transaction commits); its findings are
        then recorded with the run alone."""
        try:
            with self.store.write(bulk=True) as conn:
                outcome = self._apply_in(conn, ctx)
        except _RollBack as stop:
            self._record_rolled_back(ctx, stop.outcome)
        else:
            ctx.log.info("sync_applied", **outcome.counts)
        with self.store.read() as conn:
            return load_report(conn, ctx.run_id)

    def _record_rolled_back(self, ctx: RunContext, outcome: Outcome) -> None:
        """The report of a held or dry run: its status, counts, rejections and warnings. A
        held run keeps its staged rows for ``runs approve``; a dry run is never approved and
        lets them go."""
        held = bool(outcome.hold_reasons)
        reason = "; ".join(outcome.hold_reasons) or None
        if held:
            event = "dry_run_would_hold" if ctx.dry_run else "sync_held"
            ctx.log.warning(event, reason=reason, **outcome.counts)
        if held:
            status = "held"
        else:
            status = "succeeded_with_errors" if outcome.counts["records_rejected"] else "succeeded"
        with self.store.write() as conn:
            if not recovery.still_running(conn, ctx.run_id):
                return  # cut off meanwhile: failed as interrupted, its staging cleared
            if ctx.dry_run:
                clear_staging(conn, ctx.run_id)
            elif ctx.known is not None:
                # Approval compares staging with the mirror again, in another process: the
                # rows the fetch left out as unchanged go in as the mirror holds them.
                ctx.known.complete(conn, ctx.run_id)
            record_outcome(conn, ctx.run_id, outcome)
            if outcome.changes is not None:
                changeset.save(conn, outcome.changes)
            runs.end_run(
                conn,
                ctx.run_id,
                status=status,
                counts=outcome.counts,
                fetched=outcome.fetched(ctx.fetched),
                newest=ctx.newest,
                finished_at=utcnow(),
                hold_reason=reason,
            )

    def _apply_in(self, conn: Connection, ctx: RunContext) -> Outcome:
        """The apply, inside its one transaction: merge what changed, decide who is provisioned,
        judge the run's safety, then carry the decisions out. A held or dry run raises
        :class:`_RollBack` on the way (see "rollback by exception" in the module docstring)."""
        lock_directory(conn, exclusive=True)  # before any read: see lock_directory
        self._hold_lease(conn, ctx.source)  # still ours, and nobody takes it until the commit
        repeats = Repeats()
        repeats.update(ctx.repeats)
        repeats.update(prepare_staging(conn, ctx.run_id))  # SQLite: settled, key index built
        found = self._merge_changes(conn, ctx)
        decision = self._decide(conn, ctx, found)
        if not ctx.approved:  # an approval's staging shows fewer: the held run's report said
            decision.outcome.warnings += repeated.warnings(repeats)
            decision.outcome.repeated = repeats.counts()  # an approval's fetched carry them
        decision.outcome.warnings += dangling.warnings(found.orphans)
        self._judge(conn, ctx, found, decision, repeats)
        return self._carry_out(conn, ctx, found, decision)

    def _merge_changes(self, conn: Connection, ctx: RunContext) -> _Merged:
        """Find what the staged rows change, merge them into the mirror, and mark what the
        resyncs must re-read."""
        source, run_id, full = ctx.source, ctx.run_id, ctx.full
        pending_removals = provisioning.removals_pending(
            conn, source, self.settings.provisioning.teacher_roles
        )
        grouped = detect.group_ids(conn, source)
        changes = detect.find_changes(
            conn, source, run_id, full=full, grouped=grouped, known=ctx.known
        )
        changed_people = changes.persons
        # Classes whose changes touch only their students' rows keep their owners; if they
        # have a group and still a student after the merge, the sync updates just those
        # members itself and nobody's groups need rebuilding (a renamed student in a large
        # district no longer queues every teacher). The other dirty classes go to resyncs.
        student_side = (changes.dirty_classes - changes.owner_classes) & grouped.keys()
        # Student-side classes keep their teachers through the merge: asking after it is enough.
        teachers_before = detect.teachers_of_classes(
            conn, source, changes.dirty_classes - student_side
        )
        written = merging.merge(
            conn,
            source,
            run_id,
            changes.missing,
            changes.in_place,
            changes.to_write,
            refresh_fp=ctx.known.staged if ctx.known is not None else None,
        )
        merging.refresh_statistics(conn, written)
        orphans = dangling.dangling_enrollments(conn, source, changes)
        members_only = detect.populated_classes(conn, source, student_side)
        dirty = changes.dirty_classes - members_only
        teachers_after = detect.teachers_of_classes(conn, source, dirty)
        affected_people = teachers_before | teachers_after | changed_people
        mark_dirty(
            conn,
            source,
            changes.refresh_classes,
            {(c, p) for c, p in changes.member_pairs if c not in members_only},
            grouped,
        )
        return _Merged(
            grouped, changes, members_only, dirty, affected_people, pending_removals, orphans
        )

    def _decide(self, conn: Connection, ctx: RunContext, found: _Merged) -> _Decision:
        """The provisioning plan: who is created, linked, archived or restored."""
        source, full = ctx.source, ctx.full
        settings = self.settings
        affected_people = found.affected_people
        counts = empty_counts()
        # A delta run decides only for the people its changes can concern: a teacher's
        # eligibility depends on their own row, their teacher enrollments, those classes and
        # those classes' students, and each of those changes marks the teacher affected.
        # Everyone else is as the last run left them; the periodic full run re-decides all,
        # and so does a run that finds the provisioning settings changed since: who counts as
        # a teacher, and whose address may be an account, may have changed for anyone.
        state = source_state(conn, source)
        decided_with = settings.provisioning_fingerprint()
        stored = (state["decided_with"] if state else None) or ""
        directory_changed = stored.startswith(provisioning.DIRECTORY_CHANGED)
        settings_changed = (
            state is not None
            and stored.removeprefix(provisioning.DIRECTORY_CHANGED) != decided_with
        )
        active_users = provisioning.count_active_users(conn)
        limit = settings.license_limit
        seats_freed = bool(
            state and state["license_waiting"] and limit is not None and active_users < limit
        )
        redecide = not full and (settings_changed or directory_changed or seats_freed)
        roles = settings.provisioning.teacher_roles
        only = None
        if not (full or redecide):
            # Also who was rejected for an email claimed under another name: the person it
            # clashed with may have changed.
            only = affected_people | provisioning.name_conflicts(conn, source)
        candidates = provisioning.eligible_teachers(conn, source, roles, only)
        linked = provisioning.linked_users(conn, source, only)
        unlinked = {
            normalize_email(t.email)
            for t in candidates
            if t.sourced_id not in linked
            and email_rejection(t.email, settings.provisioning) is None
        }
        if only is not None and unlinked:
            # Who shares an address with a person not linked yet is decided with them: who
            # gets the account, if anyone, depends on all their names.
            mates = provisioning.persons_with_emails(conn, source, roles, unlinked) - only
            if mates:
                only |= mates
                candidates += provisioning.eligible_teachers(conn, source, roles, mates)
                linked.update(provisioning.linked_users(conn, source, mates))
        teaching_elsewhere: set[int] = set()
        if only is not None:
            # The other persons of the accounts decided here (one record per school): an
            # account is archived only when none of its persons teaches.
            others = provisioning.source_identities(
                conn, source, {u.user_id for u in linked.values()}
            )
            siblings = {sid: uid for uid, ps in others.items() for sid, _ in ps}
            outside = set(siblings) - only
            if outside:
                teaching_elsewhere = {
                    siblings[t.sourced_id]
                    for t in provisioning.eligible_teachers(conn, source, roles, outside)
                }
        unlinked_emails = [t.email for t in candidates if t.email and t.sourced_id not in linked]
        existing = provisioning.users_by_email(conn, unlinked_emails)
        # The persons of this source an existing account already has: a person of another
        # name may not join it.
        persons = provisioning.account_persons(conn, source, {u.user_id for u in existing.values()})
        plan = plan_provisioning(
            source,
            candidates,
            linked,
            existing,
            prov=settings.provisioning,
            active_users=active_users,
            license_limit=limit,
            teaching_elsewhere=teaching_elsewhere,
            claims={e: persons[u.user_id] for e, u in existing.items() if u.user_id in persons},
        )
        outcome = Outcome(
            counts,
            rejected=[Rejected("user", sid, reason) for sid, reason in plan.rejected],
            warnings=_shared_email_warnings(conn, source, plan),
        )
        if redecide:
            if settings_changed:
                why = "provisioning settings or license_limit changed"
            elif directory_changed:
                why = "users were imported or changed by an import"
            else:
                why = "license seats are free for teachers who waited for one"
            outcome.warnings.append(
                f"{why} since the last run: this delta run decided for every teacher of the "
                "source, not only those its changes touched"
            )
        return _Decision(state, decided_with, settings_changed, redecide, only, plan, outcome)

    def _judge(
        self,
        conn: Connection,
        ctx: RunContext,
        found: _Merged,
        decision: _Decision,
        repeats: Repeats,
    ) -> None:
        """Count what the plan does and ask the safety rules whether the run must be held."""
        source, run_id, full = ctx.source, ctx.run_id, ctx.full
        settings = self.settings
        roles = settings.provisioning.teacher_roles
        plan, outcome, state = decision.plan, decision.outcome, decision.state
        redecide, dirty, changes = decision.redecide, found.dirty, found.changes
        counts = outcome.counts
        managed_users, managed_groups = provisioning.managed_counts(conn, source)
        groups_removed = provisioning.groups_to_remove(
            conn,
            source,
            roles,
            plan.archive,
            None if full or redecide else dirty,
            restored=plan.restore,
            new_owners={link.sourced_id for link in plan.link}
            | {sid for new in plan.create for sid, _ in new.identities},
            # Under changed provisioning settings the waiting jobs' removals may be this
            # run's too: count them.
            decided=set() if decision.settings_changed else found.pending_removals,
        )
        if decision.settings_changed:
            # The run resyncs every user of the source, and their groups of other sources
            # follow the new settings too: what it removes there is its removal.
            elsewhere, rebuilt = provisioning.other_sources_removals(
                conn, source, roles, plan.archive, restored=plan.restore
            )
            groups_removed += elsewhere
            managed_groups += rebuilt
        # What the scope step left out right after the fetch (kept with the run's fetched).
        counts.update({k: int(ctx.fetched.get(k, 0)) for k in SCOPE_COUNT_KEYS})
        counts.update(
            users_created=len(plan.create),
            users_linked=len({link.user_id for link in plan.link}),  # accounts, not persons
            users_archived=len(plan.archive),
            users_restored=len(plan.restore),
            users_skipped_license=len(plan.skipped_license),
            users_not_created=len(plan.not_created),
            records_rejected=source_rejections(conn, run_id) + len(plan.rejected),
        )
        if not ctx.approved:
            fingerprint = fingerprint_of(settings.sources[source])
            now_counts, last = ratio_counts(
                outcome.fetched(ctx.fetched), state["last_counts"] if state else None, fingerprint
            )
            verdict = check_safety(
                safety=settings.safety_for(source),
                users_archived=len(plan.archive),
                groups_removed=groups_removed,
                managed_users=managed_users,
                managed_groups=managed_groups,
                fetched=now_counts if full else None,
                last_fetched=last,
                emails_lost=changes.emails_lost,
                emails_before=changes.emails_before,
            )
            reasons = list(verdict.reasons)
            if full and ctx.shifting and settings.safety_for(source).hold_on_repeats:
                reasons += repeated.hold_reasons(repeats, changes.missing)
            if reasons:
                counts["groups_removed"] = groups_removed
                outcome.hold_reasons = tuple(reasons)
        decision.groups_removed = groups_removed

    def _carry_out(
        self, conn: Connection, ctx: RunContext, found: _Merged, decision: _Decision
    ) -> Outcome:
        """Provision, queue the resyncs and record the run; or, for a held or dry run, find
        what it would change and roll back."""
        source, run_id = ctx.source, ctx.run_id
        plan, outcome, state, only = decision.plan, decision.outcome, decision.state, decision.only
        counts, groups_removed = outcome.counts, decision.groups_removed
        affected_people, changes, grouped = found.affected_people, found.changes, found.grouped
        members_only, settings_changed = found.members_only, decision.settings_changed
        decided_with = decision.decided_with
        held = bool(outcome.hold_reasons)
        # A held run always records its change set (the admin who approves it reads it); a
        # dry run only when asked (--changes): it costs the resync work of the run.
        preview = held or ctx.dry_run
        record = ctx.changes if ctx.dry_run else held
        before = changeset.snapshot(conn) if record else None

        # Before the plan archives anyone: only what earlier runs or commands left undone.
        # Also in a dry run a real run would hold: its report warns as the real run's would.
        leftover = provisioning.leftover_owners(conn, source)
        if leftover:
            outcome.warnings.append(
                f"{len(leftover)} archived users still owned groups of this source (their "
                "resync job failed for good or was removed): their resyncs are queued again, "
                "to remove them from those groups"
            )
        failed = provisioning.failed_last(conn, source) - leftover
        if failed:
            outcome.warnings.append(
                f"{len(failed)} users' last resync job failed for good (see queue list): "
                "their resyncs are queued again"
            )
        # A dry run a real run would hold goes on too, to count the resyncs that run would
        # queue; like every held or dry run, it rolls all of it back below.
        created = provisioning.apply_provisioning(conn, source, plan)
        if len(created) > 1000:
            merging.refresh_directory_statistics(conn)
        resync_users = (
            provisioning.users_of_persons(conn, source, affected_people)
            | plan.touched_users
            | created
            | leftover
            | failed
        )
        if settings_changed:
            # Group ownership follows the same rules (teacher_roles), for every linked user.
            resync_users |= provisioning.source_users(conn, source)
        # A held or dry run counts them too: its counts are what it would have done (the
        # same number an approval then reports), though it queues none of them.
        counts["resync_queued"] = len(resync_users)
        if preview and before is None:
            counts["groups_removed"] = groups_removed
            raise _RollBack(outcome)
        if not preview:
            reason = f"sync run {run_id}"
            queue_resync(conn, resync_users - failed, reason=reason, run_id=run_id)
            # A failed job's member marks were dropped once nothing waited for them: its
            # user's groups are re-read whole.
            queue_resync(conn, failed, reason=reason, run_id=run_id, refresh=True)
        members_updated = update_members(
            conn, source, {(c, p) for c, p in changes.member_pairs if c in members_only}, grouped
        )
        # Groups that import owners alone keep: no teacher's resync reads them, so the sync
        # gives them their changed classes' titles and students itself.
        followed = follow_classes(
            conn, kept_by_import(conn, [grouped[c] for c in found.dirty if c in grouped])
        )
        stamp_updated(conn, sorted(followed), utcnow())
        if before is not None:
            counts["groups_removed"] = groups_removed
            outcome.changes = self._preview_changes(
                conn, ctx, before, plan, resync_users, refresh=failed
            )
            raise _RollBack(outcome)
        counts["groups_updated"] += members_updated + len(followed)
        # Who waits for a seat is known exactly when everyone was decided; a delta run that
        # decided for some only adds its own.
        waiting = bool(plan.skipped_license) or (
            only is not None and bool(state and state["license_waiting"])
        )
        self._record_success(conn, ctx, outcome, state, decided_with, license_waiting=waiting)
        return outcome

    def _preview_changes(
        self,
        conn: Connection,
        ctx: RunContext,
        before: changeset.Snapshot,
        plan: ProvisionPlan,
        resync_users: set[int],
        *,
        refresh: set[int],
    ) -> changeset.ChangeSet:
        """A held or dry run, applied but not committed: do what the resync workers would do
        for its users after it (from the mirror, as their jobs would: a user's queued manual
        or live job re-reads every member, and so does the job of one whose last job failed:
        ``refresh``), then diff the directory with the snapshot.

        Jobs an earlier run or command left waiting (a drain cut short) run in the same drain,
        so their users are rebuilt too: their groups are part of what approving does."""
        earlier = pending_users(conn) - resync_users
        users = resync_users | earlier
        queued = queued_jobs(conn, users)
        roles = self.settings.provisioning.teacher_roles
        rebuild_groups(
            conn,
            users,
            teacher_roles=roles,
            refresh_all=[uid for uid, whole, live in queued if whole or live] + sorted(refresh),
        )
        notes = []
        if earlier:
            notes.append(
                f"{len(earlier)} users have resyncs queued by an earlier run or command: "
                "their groups are shown as those resyncs will leave them"
            )
        live_users = sum(1 for _, _, live in queued if live)
        if live_users:
            notes.append(
                f"{live_users} of the users have a live resync queued: their groups are shown "
                "as the mirror has them, and the resync re-reads their classes from the source"
            )
        return changeset.collect(
            conn,
            ctx.source,
            ctx.run_id,
            before,
            plan,
            teacher_roles=roles,
            notes=notes,
            scoped_out=ctx.scoped_out,
        )

    def _record_success(
        self,
        conn: Connection,
        ctx: RunContext,
        outcome: Outcome,
        state: Mapping[str, Any] | None,
        decided_with: str,
        *,
        license_waiting: bool,
    ) -> None:
        """The applied run's source state, report and staging, in its own transaction."""
        source, run_id = ctx.source, ctx.run_id
        now = utcnow()
        old_hwm = as_utc(state["high_water_mark"]) if state else None
        if old_hwm is not None and old_hwm > now:  # stored before fetch.Ahead: no mark
            old_hwm = None
        hwm = max((d for d in (ctx.newest, old_hwm) if d is not None), default=None)
        values: dict[str, Any] = {
            "high_water_mark": hwm,
            "last_success_at": now,
            "last_run_id": run_id,
            "decided_with": decided_with,
            "license_waiting": license_waiting,
        }
        if ctx.full:
            values["last_full_at"] = now
            config = self.settings.sources.get(source)
            fingerprint = fingerprint_of(config) if config is not None else 0
            values["last_counts"] = last_counts(outcome.fetched(ctx.fetched), fingerprint)
        runs.save_source_state(conn, source, values, new=state is None)
        record_outcome(conn, run_id, outcome)
        status = "succeeded_with_errors" if outcome.counts["records_rejected"] else "succeeded"
        runs.end_run(
            conn,
            run_id,
            status=status,
            counts=outcome.counts,
            fetched=outcome.fetched(ctx.fetched),
            newest=ctx.newest,
            finished_at=now,
        )
        # This run's staging, and that of older held runs it supersedes, is no longer needed.
        for rid in (run_id, *runs.held_before(conn, source, run_id)):
            clear_staging(conn, rid)
        changeset.forget(conn, source, run_id)
