"""QEMU guests across non-identical arm64 hosts with invariantd in the path: two lab guests (real Linux kernels on
two CPU revisions), each running the real daemon on its /dev/kvm and Debian's arm64 QEMU -accel kvm with the
invariantd agent preloaded; the source daemon migrates the payload VM (migrateVmm): plan from the agent's snapshot
and pre-flight before any page moves, QEMU's own migration with return-path, the switchover held until the
destination agent applied and read back the plan. Every assertion about the guest comes from the payload's own
UART lines: its counter (x19, carried by the migration) and the MIDR_EL1 / ID_AA64PFR0_EL1 it reads.
Guest side: daemon/lab/vmmig.py. Stock QEMU on the same pairs (for contrast): test_qemu_stock.py."""
from __future__ import annotations

import json

import pytest

from invariantd.daemon.lab import qemu

pytestmark = pytest.mark.lab

MIDR_R0P3, MIDR_R0P4 = 0x410fd083, 0x410fd084
DEST_612_R0P4 = qemu.GuestSpec("6.12", "cortex-a72,midr=0x410fd084", "10.0.0.1/24", "52:54:00:12:34:01")
DEST_7X_N1 = qemu.GuestSpec("7.x", "neoverse-n1", "10.0.0.1/24", "52:54:00:12:34:01")


def migrate(*, variant="q11", dest=qemu.DEST, source=qemu.SOURCE, timeout=330):
    m = qemu.migrate_with_daemons(variant=variant, dest=dest, source=source, timeout=timeout)
    return m.dest, m.source, m.pair


def _show(*docs) -> str:
    return "\n".join(json.dumps(d, indent=1, default=str)[-5000:] for d in docs)


def _n(p) -> int:
    return int(p["n"], 16)


def _agent(doc, role):
    return next((v for v in doc.get("vmms", []) if v["role"] == role), None)


def assert_committed_and_counting_on(d, s, midr_seen):
    """The source daemon committed, the source QEMU quit, and the destination's payload continued the source's
    counter (no reboot) reading the MIDR the plan chose, with the plan applied and read back by the agent."""
    assert s.get("migration", {}).get("state") == "committed", _show(s, d)
    detail = s["migration"]["detail"]          # the source's record: QEMU's figures, the destination agent's view
    assert detail["qemu"]["status"] == "completed" and detail["destination"]["running"], detail
    assert not s["source_qemu_running"], _show(s)
    last = int(s["last_n_before"], 16)
    lines = d["lines"]
    assert lines and _n(lines[0]) > last, _show(d, s)          # the counter continues: the same guest, no reboot
    assert {int(p["midr"], 16) for p in lines} == {midr_seen}, lines
    ag = _agent(d, "destination")
    assert ag and ag["program_digest"] and not ag["refused"], _show(d)
    assert {v["phase"] for v in ag["verify"]} == {1, 2} and all(not v["bad"] for v in ag["verify"]), ag["verify"]
    assert not [e for e in ag["events"] if e["kind"] == "decision" and e["action"] == "FAIL"], ag["events"]
    return ag


def test_next_revision_onto_a_newer_kernel_keeps_the_source_midr_with_cap239(q11):
    """6.12 on Cortex-A72 r0p3 -> 7.x on r0p4, QEMU 11.1 (stock QEMU dies on MIDR here): cap 239 pins MIDR, the
    guest keeps reading 0x410fd083; the drift registers 6.12 lists and 7.x does not are listed and dropped."""
    d, s, pair = migrate()
    print(f"\ncap239 pair: {pair.seconds:.0f} s, migration {s.get('migration_wall_s')} s")
    ag = assert_committed_and_counting_on(d, s, MIDR_R0P3)
    caps = [e for e in ag["events"] if e["kind"] == "cap239"]
    assert caps and all(e["errno"] == "" for e in caps), ag["events"]
    src_agent = s["agent"]
    assert src_agent and src_agent["vcpus_snapshotted"] == [0], _show(s)
    assert any("invariantd_migrations_total" in ln and "committed" in ln for ln in s["metrics"]), s["metrics"]


def test_next_revision_on_a_kernel_without_cap239_shows_the_planned_midr(q11):
    """6.12 r0p3 -> 6.12 r0p4: no cap 239, so the plan overrides MIDR (a guest-visible change the policy allows
    within one part); the agent writes the planned value, the guest reads the new revision."""
    d, s, _ = migrate(dest=DEST_612_R0P4)
    ag = assert_committed_and_counting_on(d, s, MIDR_R0P4)
    assert not [e for e in ag["events"] if e["kind"] == "cap239"], ag["events"]
    over = [e for e in ag["events"] if e["kind"] == "override" and e["register"] == "MIDR_EL1"]
    assert over and over[0]["final"] == hex(MIDR_R0P4) and over[0]["verdict"] == "override", ag["events"]
    assert any(ln.startswith('invariantd_invariant_overrides_total{action="override-plan",register="MIDR_EL1"}')
               for ln in d["metrics"]), d["metrics"]


def test_drift_on_qemu10_is_listed_for_qemu_and_dropped(q10):
    """QEMU 10.0 (trixie) refuses a stream listing registers its host does not (cpreg_vmstate_array_len): the
    agent lists 6.12's TCR2_EL1 / PIR_EL1 / PIRE0_EL1 on 7.x (the VM has neither FEAT_TCR2 nor FEAT_S1PIE) and
    drops their writes."""
    d, s, _ = migrate(variant="q10")
    ag = assert_committed_and_counting_on(d, s, MIDR_R0P3)
    listed = [e for e in ag["events"] if e["kind"] == "listed"]
    assert listed and int(listed[0]["register"]) == 3, ag["events"]
    drops = {e["register"] for e in ag["events"] if e["kind"] == "decision" and e["action"] == "DROP"}
    assert drops == {"TCR2_EL1", "PIR_EL1", "PIRE0_EL1"}, ag["events"]


def test_another_part_is_refused_before_any_page_moves(q11):
    """Cortex-A72 -> Neoverse-N1 (7.x): the plan refuses; QEMU's migration never starts, the source guest keeps
    counting and the destination QEMU never runs it."""
    d, s, _ = migrate(dest=DEST_7X_N1, timeout=300)
    m = s.get("migration", {})
    assert m.get("state") == "failed" and m["error"]["kind"] == "refused", _show(s)
    assert "MIDR_EL1" in m["error"]["message"], m["error"]
    assert s["still_counting"] and s["source_qemu_running"], _show(s)
    assert s["query_migrate"].get("return") == {}, s["query_migrate"]    # no migration ever started there
    assert not d["running_here"], _show(d)
