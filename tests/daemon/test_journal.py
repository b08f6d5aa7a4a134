"""The migration journal (daemon/journal.py), the Inquiry exchange (protocol 5) and the settle rule (daemon/vms.py)."""
from __future__ import annotations

import sqlite3

import pytest

from invariantd.daemon.journal import Journal, JournalError
from invariantd.daemon.vms import settle
from invariantd.protocol import session as ps
from invariantd.protocol.errors import ProtocolError


def test_durable_wal_and_reopened(tmp_path):
    p = str(tmp_path / "j.db")
    j = Journal(p)
    assert j.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert j.db.execute("PRAGMA synchronous").fetchone()[0] == 2          # FULL
    j.begin("m1", "vm", "source", "node-b", b"\x01" * 32)
    j.step("m1", "paused")
    j.vm("vm", "paused", "created", "m1", "node-b")
    del j                                                                 # no close: as after kill -9
    j2 = Journal(p)
    assert (j2.migration("m1").phase, j2.migration("m1").outcome, j2.vm_record("vm").state) == \
        ("paused", "open", "paused")
    assert (tmp_path / "j.db").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("role,phase,after", [
    ("source", "plan", "lost"), ("source", "paused", "lost"), ("source", "released", "in-doubt"),
    ("destination", "plan", "aborted"), ("destination", "applied", "lost"), ("destination", "running", "committed"),
    ("vmm-source", "switchover", "in-doubt"),       # QEMU runs on: the resolver settles it (settle_source)
    ("vmm-destination", "incoming", "open"),        # the source settles it, asking our status (journal's qmp)
])
def test_restart_closes_open_migrations(tmp_path, role, phase, after):
    j = Journal(str(tmp_path / "j.db"))
    j.begin("m", "vm", role, "p")
    j.step("m", phase)
    j.vm("vm", "running", "created", "m", "p")
    j.vm("gone", "removed")
    died, was_open = Journal(str(tmp_path / "j.db")).restarted()
    assert [v.name for v in died] == ["vm"] and [m.id for m in was_open] == ["m"]
    j3 = Journal(str(tmp_path / "j.db"))
    assert j3.migration("m").outcome == after
    assert j3.vm_record("vm").state == "lost" and "died running" in j3.vm_record("vm").detail
    assert j3.vm_record("gone").state == "removed"


def test_unwritable_journal_is_one_line(tmp_path):
    with pytest.raises(JournalError, match="journal .*nodir/j.db: No such file"):
        Journal(str(tmp_path / "nodir" / "j.db"))
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(JournalError, match="junk.db"):
        Journal(str(tmp_path / "junk.db"))


def test_a_failed_write_is_logged_not_raised(tmp_path, caplog):
    j = Journal(str(tmp_path / "j.db"))
    j.db.close()
    j.db = sqlite3.connect(":memory:")             # no tables: every write fails
    j.begin("m", "vm", "source", "p")
    assert "write failed" in caplog.text


@pytest.mark.parametrize("role,outcome,phase,vm,action", [
    ("destination", "in-doubt", "released", None, "resume"),     # the source released it
    ("destination", "aborted", "paused", "running", "discard"),  # the source resumed its copy
    ("destination", "lost", "paused", None, "resume"),           # the source died holding it: ours is the only one
    ("destination", "open", "streamed", "paused", "wait"),
    ("destination", "", "", "running", "discard"),
    ("destination", "", "", None, "wait"),                       # no record, no VM: an operator decides
    ("source", "committed", "running", "running", "committed"),
    ("source", "committed", "running", None, "committed"),       # it ran there (and died): never run a stale copy
    ("source", "lost", "applied", None, "resume"),               # died paused, never ran there
    ("source", "in-doubt", "applied", "in-doubt", "wait"),       # it asks us and resumes
    ("source", "", "", None, "wait"),
])
def test_the_settle_rule(role, outcome, phase, vm, action):
    assert settle(role, outcome, phase, vm)[0] == action


def _greet(versions=ps.PROTOCOL_VERSIONS):
    s, d = ps.Session(ps.SOURCE, versions=versions), ps.Session(ps.DESTINATION)
    for ev, a, b in ((ps.Hello(versions, ps.SOURCE), s, d), (ps.Hello(ps.PROTOCOL_VERSIONS, ps.DESTINATION), d, s),
                     (ps.Capabilities("x", b""), d, s)):
        b.receive_data(a.send(ev))
        assert b.next_event() == ev
    return s, d


def test_inquiry_round_trip():
    s, d = _greet()
    d.receive_data(s.send(ps.Inquiry("m1", "vm")))
    assert d.next_event() == ps.Inquiry("m1", "vm")
    s.receive_data(d.send(ps.Answer("m1", "vm", "committed", "running", "running")))
    assert s.next_event() == ps.Answer("m1", "vm", "committed", "running", "running")
    assert s.state is ps.DONE and d.state is ps.DONE


def test_inquiry_needs_protocol_5_and_a_matching_answer():
    s, d = _greet(versions=(3, 4))
    with pytest.raises(ProtocolError, match="protocol 4 session"):
        s.send(ps.Inquiry("m1", "vm"))
    s, d = _greet()
    d.receive_data(s.send(ps.Inquiry("m1", "vm")))
    d.next_event()
    with pytest.raises(ProtocolError, match="asked about 'm1'"):
        d.send(ps.Answer("m2", "vm", "", "", ""))
    with pytest.raises(ProtocolError, match="outcome"):
        ps.Answer("m1", "vm", "maybe", "", "")


def test_finished_migrations_are_pruned_beyond_the_newest_but_each_vms_latest_and_undecided_ones_stay(monkeypatch):
    import invariantd.daemon.journal as J
    j = J.Journal()
    clock = iter(range(1, 10_000))
    monkeypatch.setattr(J.time, "time", lambda: float(next(clock)))
    j.begin("open-1", "vm-open", "source", "b")                  # never decided: kept whatever its age
    j.begin("doubt-1", "vm-doubt", "source", "b")
    j.decide("doubt-1", "in-doubt")
    j.begin("old-only", "vm-old", "source", "b")                  # vm-old's only (so latest) migration
    j.decide("old-only", "committed")
    for k in range(20):
        j.begin(f"m{k}", "vm-busy", "source", "b")
        j.decide(f"m{k}", "committed" if k % 2 else "aborted")
    j.prune(keep=5)
    ids = {m.id for m in j.migrations(limit=100)}
    assert {"open-1", "doubt-1", "old-only"} <= ids
    assert {f"m{k}" for k in range(15, 20)} <= ids and not ids & {f"m{k}" for k in range(0, 15)}
    assert j.last_migration_of("vm-busy").id == "m19" and j.last_migration_of("vm-old").id == "old-only"
