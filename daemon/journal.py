"""The migration journal: what this daemon decided, written before it acts, so that it survives kill -9.

One stdlib sqlite3 database (WAL, synchronous=FULL: every write below is its own transaction, on disk before the
call returns). Two tables:

- migrations: one row per migration this daemon took part in: id, VM, role (source | destination), peer (the
  [peers] name, or the certificate name of an incoming peer), plan digest, the last step reached (`phase`) and
  the outcome (`open` -> committed | aborted | in-doubt | lost), with a line saying why.
- vms: the whereabouts of every VM this daemon held: its state (vms.VmState values, plus `lost` and `removed`),
  the migration that put it there, the peer.

Write-ahead rule (daemon/peer/source.py, destination.py): a source records `released` before its Commit goes out and `aborted` before it
resumes its VM; a destination records `applied` before its Commit goes out and `running` before it runs the VM.
So whatever a peer asks after a crash (Inquiry, protocol 5), the answer never claims less than what was done.

After a restart: the daemon's own VMs died with its process (their KVM fds cannot outlive it). `restarted()`
says so honestly: every VM row still held becomes `lost`, and every open migration is closed with what the
crash means for it (see `restarted`). VMs that a VMM (QEMU) runs are not in this table: they never depended on
this process.

Phases, source:      plan -> paused -> streamed -> released -> acked
Phases, destination: plan -> preflight -> applied -> running
QEMU migrations (daemon/vmm/service.py), role vmm-source: plan -> preflight -> ram -> switchover -> completed ->
quit; role vmm-destination: prepared -> incoming. The QEMU keeps running whatever happens to this daemon; a
restarted daemon finds it again by its QMP socket (`qmp`) and settles the migration (VmmService.settle_source).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("invariantd.journal")

SCHEMA_VERSION = 1
OUTCOMES = ("open", "committed", "aborted", "in-doubt", "lost")
FINISHED = ("committed", "aborted", "lost")     # nothing more will happen to such a migration
KEEP_FINISHED = 5000        # finished migrations kept (plus each VM's latest, and every open / in-doubt one)
PRUNE_EVERY = 256           # decisions between prunes
HELD = ("running", "paused", "incoming", "in-doubt", "released")      # vms.VmState values: a VM row still held

_SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY, vm TEXT NOT NULL, role TEXT NOT NULL, peer TEXT NOT NULL, digest TEXT NOT NULL,
    phase TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL, started REAL NOT NULL, updated REAL NOT NULL,
    qmp TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS migrations_open ON migrations(outcome);
CREATE INDEX IF NOT EXISTS migrations_vm ON migrations(vm, updated);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY, state TEXT NOT NULL, origin TEXT NOT NULL, migration TEXT NOT NULL,
    peer TEXT NOT NULL, detail TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class JournalError(RuntimeError):
    """The journal cannot be opened or written; the message names the file and what to do."""


@dataclass(frozen=True)
class MigrationRecord:
    id: str
    vm: str
    role: str
    peer: str
    digest: str
    phase: str
    outcome: str
    detail: str
    started: float
    updated: float
    qmp: str = ""                  # a QEMU migration (roles vmm-source / vmm-destination): that QEMU's QMP socket

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class VmRecord:
    name: str
    state: str
    origin: str
    migration: str
    peer: str
    detail: str
    updated: float

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Journal:
    """path: the database file (created with its directory's permissions, mode 0600), or ":memory:" (nothing
    survives a restart: tests, and a daemon configured without one, which says so at start)."""

    def __init__(self, path: str = ":memory:") -> None:
        self.path = path
        self.durable = path != ":memory:"
        self._decided = 0                   # decisions since start (a prune every PRUNE_EVERY)
        try:
            if self.durable:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                os.close(fd)
            # autocommit: each statement is its own durable transaction. Written from the trio thread and from
            # worker threads (createVm, apply): one connection, one lock.
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._lock = threading.Lock()
            if self.durable:
                mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise JournalError(f"journal {path}: sqlite refused WAL mode ({mode}); use a local filesystem")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA cache_size=-512")      # KiB: the journal's hot rows are few; bounded memory
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise JournalError(f"journal {path}: schema version {row[0]}, this daemon writes {SCHEMA_VERSION} "
                                   f"(move the file aside only once no migration is in doubt)")
        except sqlite3.Error as e:
            raise JournalError(f"journal {path}: {e} (is it a sqlite database this user can write?)") from None
        except OSError as e:
            raise JournalError(f"journal {path}: {e.strerror} (set [journal] path to a writable file)") from None

    def _exec(self, sql: str, args: tuple = ()) -> None:
        try:
            with self._lock:
                self.db.execute(sql, args)
        except sqlite3.Error as e:          # disk full, file removed: the daemon goes on; the decision is logged
            log.error("journal %s: write failed (%s): %s", self.path, e, args[:3])

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    # --- migrations
    def begin(self, mid: str, vm: str, role: str, peer: str, digest: bytes = b"", phase: str = "plan",
              qmp: str = "") -> None:
        now = time.time()
        self._exec("INSERT OR REPLACE INTO migrations VALUES (?,?,?,?,?,?,'open','',?,?,?)",
                   (mid, vm, role, peer, digest.hex(), phase, now, now, qmp))

    def set_qmp(self, mid: str, qmp: str) -> None:
        self._exec("UPDATE migrations SET qmp=?, updated=? WHERE id=?", (qmp, time.time(), mid))

    def step(self, mid: str, phase: str, digest: bytes | None = None) -> None:
        if digest is not None:
            self._exec("UPDATE migrations SET phase=?, digest=?, updated=? WHERE id=?",
                       (phase, digest.hex(), time.time(), mid))
        else:
            self._exec("UPDATE migrations SET phase=?, updated=? WHERE id=?", (phase, time.time(), mid))

    def decide(self, mid: str, outcome: str, detail: str = "") -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} not one of {OUTCOMES}")
        self._exec("UPDATE migrations SET outcome=?, detail=?, updated=? WHERE id=?",
                   (outcome, detail[:1000], time.time(), mid))
        self._decided += 1
        if self._decided % PRUNE_EVERY == 0:
            self.prune()

    def prune(self, keep: int = KEEP_FINISHED) -> None:
        """Forget finished migrations beyond the newest `keep`, except each VM's latest (what in-doubt resolution
        and `inspect-vm` read); open and in-doubt ones are never forgotten. The file stays bounded over years of
        migrations, and so do the queries and the page cache."""
        marks = ",".join("?" * len(FINISHED))
        self._exec(f"""DELETE FROM migrations WHERE outcome IN ({marks}) AND updated < (
                           SELECT updated FROM migrations WHERE outcome IN ({marks})
                           ORDER BY updated DESC LIMIT 1 OFFSET ?)
                       AND updated < (SELECT MAX(m.updated) FROM migrations m WHERE m.vm = migrations.vm)""",
                   (*FINISHED, *FINISHED, max(0, keep - 1)))

    def migration(self, mid: str) -> MigrationRecord | None:
        row = self._query("SELECT * FROM migrations WHERE id=?", (mid,))[:1]
        return MigrationRecord(*row[0]) if row else None

    def migrations(self, outcome: str | None = None, limit: int = 1000) -> list[MigrationRecord]:
        if outcome is None:
            rows = self._query("SELECT * FROM migrations ORDER BY updated DESC LIMIT ?", (limit,))
        else:
            rows = self._query("SELECT * FROM migrations WHERE outcome=? ORDER BY updated DESC LIMIT ?",
                               (outcome, limit))
        return [MigrationRecord(*r) for r in rows]

    def last_migration_of(self, vm: str) -> MigrationRecord | None:
        row = self._query("SELECT * FROM migrations WHERE vm=? ORDER BY updated DESC LIMIT 1", (vm,))
        return MigrationRecord(*row[0]) if row else None

    # --- VM whereabouts
    def vm(self, name: str, state: str, origin: str = "", migration: str = "", peer: str = "",
           detail: str = "") -> None:
        self._exec("INSERT INTO vms VALUES (?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET state=excluded.state, "
                   "origin=CASE WHEN excluded.origin='' THEN origin ELSE excluded.origin END, "
                   "migration=CASE WHEN excluded.migration='' THEN migration ELSE excluded.migration END, "
                   "peer=CASE WHEN excluded.peer='' THEN peer ELSE excluded.peer END, "
                   "detail=excluded.detail, updated=excluded.updated",
                   (name, state, origin, migration, peer, detail[:1000], time.time()))

    def vms(self) -> list[VmRecord]:
        return [VmRecord(*r) for r in self._query("SELECT * FROM vms ORDER BY name")]

    def vm_record(self, name: str) -> VmRecord | None:
        row = self._query("SELECT * FROM vms WHERE name=?", (name,))
        return VmRecord(*row[0]) if row else None

    # --- restart
    def restarted(self) -> tuple[list[VmRecord], list[MigrationRecord]]:
        """Called once at start, before anything else touches the journal: what the previous process held died
        with it. Every VM row still held becomes `lost` (saying in which state it died); every open migration is
        closed with what that means for it:
          source before `released`      -> lost (we held the only runnable copy; a destination holding a
                                            verified copy may run it: an Inquiry tells it so)
          source at `released`           -> in-doubt (the destination decides; it may run the VM; the resolver
                                            asks it and records the outcome)
          destination before `applied`   -> aborted (nothing was acknowledged: the source kept the VM)
          destination at `applied`       -> lost (died paused, never ran here: the source may run its copy again)
          destination at `running`       -> committed (it ran here, then died with this process)
        Returns (the VMs that died, the migrations that were open), as they were before."""
        died = [v for v in self.vms() if v.state in HELD]
        was_open = self.migrations("open") + self.migrations("in-doubt")
        now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        for v in died:
            self.vm(v.name, "lost", detail=f"died {v.state} with the daemon's process (restart at {now} UTC): "
                                           f"KVM state cannot outlive the process that created it")
        for m in was_open:
            if m.role == "vmm-source":            # QEMU runs on: the resolver asks it and the destination
                self.decide(m.id, "in-doubt", f"the daemon restarted during a QEMU migration at phase {m.phase}")
                continue
            if m.role == "vmm-destination":      # nothing to decide here: the source settles, asking our status
                continue
            if m.role == "source":
                if m.phase in ("released", "acked"):     # the destination decides; the resolver asks it
                    self.decide(m.id, "in-doubt", "released by the previous daemon process; its copy died with it")
                    continue
                self.decide(m.id, "lost", f"the source daemon died at phase {m.phase} holding the VM; not released")
            elif m.phase == "running":
                self.decide(m.id, "committed", "ran here, then died with the daemon's process")
            elif m.phase == "applied":
                self.decide(m.id, "lost", "died paused after applying, before running: never ran here")
            else:
                self.decide(m.id, "aborted", f"the destination daemon died at phase {m.phase}, before its Commit")
        return died, was_open

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass
