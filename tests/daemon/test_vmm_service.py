"""daemon/vmm/service.py, the source side of a QEMU migration, against a scripted QMP server (a stand-in for QEMU
that speaks the QMP wire protocol to the real qemu.qmp client) and a scripted destination daemon: what the
daemon asks QEMU to do, and in which order, when the plan is refused, when the destination agent fails, and when
everything goes well. The real thing runs in the lab (tests/lab/test_qemu_agent.py)."""
from __future__ import annotations

from types import SimpleNamespace

import trio

from support.fixtures import FakeQemu
from invariantd.daemon.readback import read_vm
from invariantd.daemon.probe import probe
from invariantd.daemon.sim.host import SimHost
from invariantd.daemon.vmm.hub import AgentHub, VmmRecord
from invariantd.daemon.vmm.service import Incoming, VmmError, VmmService
from invariantd.protocol import agentwire as W
from invariantd.protocol import schemas as S
from invariantd.protocol.policy import default_policy


def source_service(spec="cortex-a72-r0p3@7.3"):
    """A source daemon's service whose agent reported a 1-vCPU QEMU VM on the simulated host `spec`."""
    host = SimHost(spec)
    vm = host.create_vm()
    v = vm.create_vcpu(0)
    v.init(host.init)
    regs = read_vm({0: v})[0]
    hub = AgentHub("/nonexistent")
    rec = VmmRecord(pid=42, uid=0, role=W.Role.SOURCE, vm="web-1")
    rec.snapshots[0] = W.Snapshot(0, tuple(r for r, _ in regs), tuple(regs), features=1 << 2)   # PSCI_0_2
    hub._vmms[42] = rec
    return VmmService(hub, backend=host, host=None, policy=default_policy())


def peer(dest_spec, statuses):
    """A scripted destination daemon: its capabilities and a sequence of vmm_status answers."""
    pol = default_policy()
    dest = S.host_from_doc(probe(SimHost(dest_spec)), frozenset(pol.drift))
    calls = []

    async def caps(name):
        return dest

    async def call(name, method, *args):
        calls.append(method)
        if method == "vmm_status":
            return statuses.pop(0) if len(statuses) > 1 else statuses[0]
        return {}
    return caps, call, calls


OK = {"applied": True, "running": False, "failed": [], "agent": {}, "qemu": None}
RUNNING = dict(OK, running=True)


async def run(svc, fq, caps, call):
    mig = SimpleNamespace(id="m-1", phase="", plan_digest=b"", detail={}, state="running", result="")
    try:
        await svc.run_source(mig, "web-1", "b", fq.path, "tcp:10.0.0.1:4444", "", peer_caps=caps, peer_call=call,
                             apply_timeout=5, commit_timeout=5)
        return mig, None
    except VmmError as e:
        return mig, e


async def test_committed_flow_holds_the_switchover_and_quits_the_source_last(tmp_path):
    fq = FakeQemu(str(tmp_path / "q.sock"))
    caps, call, calls = peer("cortex-a72-r0p4@7.3", [OK, OK, RUNNING])
    mig, err = await run(source_service(), fq, caps, call)
    assert err is None and mig.phase == "done"
    assert fq.names() == ["migrate-set-capabilities", "migrate", "migrate-continue", "quit"]
    assert {c["capability"] for c in fq.cmds[0][1]["capabilities"]} == {"return-path", "pause-before-switchover",
                                                                        "events"}
    assert calls[0] == "prepare_vmm" and mig.detail["destination"]["running"]
    # QEMU's MIGRATION events drive the switchover: pre-switchover answered as it is emitted, not polled for
    names = [c for c, _ in fq.cmds]
    assert names[names.index("migrate"):][:2] == ["migrate", "migrate-continue"], names
    hold = mig.detail["switchover"]                      # what the held switchover added to QEMU's downtime
    assert set(hold) == {"noticed", "decided", "journal", "continue"} and all(v >= 0 for v in hold.values())


async def test_a_qemu_that_sends_no_migration_events_is_asked(tmp_path):
    """No MIGRATION event (an old QEMU, a lost event): the switchover wait asks query-migrate every EVENT_WAIT."""
    fq = FakeQemu(str(tmp_path / "q.sock"), events=False)
    caps, call, _ = peer("cortex-a72-r0p4@7.3", [OK, OK, RUNNING])
    mig, err = await run(source_service(), fq, caps, call)
    assert err is None and mig.phase == "done"
    assert fq.names() == ["migrate-set-capabilities", "migrate", "migrate-continue", "quit"]
    assert [c for c, _ in fq.cmds].count("query-migrate") >= 3


async def test_refused_plan_moves_nothing(tmp_path):
    fq = FakeQemu(str(tmp_path / "q.sock"))
    caps, call, calls = peer("neoverse-n1@7.3", [OK])
    mig, err = await run(source_service(), fq, caps, call)
    assert err is not None and err.kind == "refused" and "MIDR_EL1" in err.message
    assert fq.cmds == [] and calls == []                  # QEMU untouched, the destination never asked


async def test_a_failed_write_at_the_destination_cancels_before_the_switchover(tmp_path):
    fq = FakeQemu(str(tmp_path / "q.sock"))
    failed = dict(OK, failed=[{"register": "MIDR_EL1", "action": "FAIL"}])
    caps, call, _ = peer("cortex-a72-r0p4@7.3", [OK, failed])
    mig, err = await run(source_service(), fq, caps, call)
    assert err is not None and "switchover refused" in err.message
    assert "migrate-continue" not in fq.names() and "quit" not in fq.names()
    assert "migrate_cancel" in fq.names() and fq.running          # the source guest runs again


async def test_destination_agent_never_applies_nothing_moves(tmp_path):
    fq = FakeQemu(str(tmp_path / "q.sock"))
    caps, call, _ = peer("cortex-a72-r0p4@7.3", [dict(OK, applied=False)])
    svc = source_service()
    with trio.move_on_after(20):
        mig, err = await run(svc, fq, caps, call)
    assert err is not None and "did not report the plan applied" in err.message
    assert "migrate" not in fq.names()


async def test_incoming_waits_for_a_destination_qemu_that_is_still_starting(tmp_path):
    """incomingVmm may come before the orchestrator's destination QEMU has its QMP socket: retried, not failed."""
    svc = source_service()
    svc.incoming["m-1"] = Incoming("m-1", "web-1", b"")
    path = str(tmp_path / "late.sock")

    async def late():
        await trio.sleep(0.8)
        return FakeQemu(path)
    async with trio.open_nursery() as n:
        n.start_soon(late)
        out = await svc.listen("m-1", path, "tcp:0.0.0.0:4444")
    assert out["status"]["status"] == "running"


# --- settling an in-doubt QEMU migration (a daemon restarted during it, or could not ask after the switchover) ----
def _row(svc, fq, phase):
    svc.journal.begin("m-9", "web-1", "vmm-source", "b", b"\1" * 32, phase, qmp=fq.path)
    svc.journal.decide("m-9", "in-doubt", "restart")
    return svc.journal.migration("m-9")


def _dest(answer):
    async def call(peer, method, mid):
        if isinstance(answer, Exception):
            raise answer
        return answer
    return call


async def test_settle_before_the_switchover_resumes_the_source(tmp_path):
    fq = FakeQemu(str(tmp_path / "q.sock"), states=("pre-switchover",))
    fq.running = False
    svc = source_service()
    action, why = await svc.settle_source(_row(svc, fq, "switchover"), _dest(VmmError("unreachable", "down")))
    assert action == "resumed" and fq.names() == ["migrate_cancel"] and fq.running    # cancel resumes the guest
    assert svc.journal.migration("m-9").outcome == "aborted"


async def test_settle_after_a_completed_migration_quits_the_source_once_the_destination_runs(tmp_path):
    fq = FakeQemu(str(tmp_path / "q.sock"), states=("completed",))
    fq.running = False
    svc = source_service()
    row = _row(svc, fq, "completed")
    action, why = await svc.settle_source(row, _dest(VmmError("unreachable", "connection refused")))
    assert action == "wait" and "cannot be asked" in why and fq.names() == []          # never resumed unasked
    action, why = await svc.settle_source(row, _dest(dict(OK, qemu={"status": "paused"})))
    assert action == "wait" and "holds the whole guest but is paused" in why and fq.names() == []
    action, why = await svc.settle_source(row, _dest(dict(RUNNING, qemu={"status": "running"})))
    assert action == "committed" and fq.names() == ["quit"]
    assert svc.journal.migration("m-9").outcome == "committed"


async def test_settle_with_the_source_qemu_gone(tmp_path):
    svc = source_service()
    gone = SimpleNamespace(path=str(tmp_path / "none.sock"))
    row = _row(svc, gone, "quit")                        # it quit as told, then the daemon died
    assert (await svc.settle_source(row, _dest(VmmError("unreachable", "x"))))[0] == "committed"
    row = _row(svc, gone, "ram")
    assert (await svc.settle_source(row, _dest(VmmError("unreachable", "x"))))[0] == "wait"
    assert (await svc.settle_source(row, _dest(dict(OK, qemu={"status": "inmigrate"}))))[0] == "lost"
