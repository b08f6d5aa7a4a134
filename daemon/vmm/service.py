"""Migrations of VMs that QEMU runs, driven by the daemons (the orchestrator RPC's *Vmm methods call these).

QEMU's own migration stream carries memory and devices, QEMU to QEMU; the daemons decide and prove the vCPU
ID registers before any page moves and hold the switchover until the destination agent applied them:

  source daemon                                          destination daemon
  plan: the source agent's snapshot (the guest's real     prepare: re-plans the same profile against this host
        ID registers) against the peer's capabilities  ->          (digests must agree), pre-flights it on a
                                                                   scratch VM, holds the compiled program for
                                                                   the destination QEMU's agent
                                                       -> incoming: the destination QEMU (-incoming defer):
                                                                   return-path, migrate-incoming URI
        waits until the destination agent reports the program applied at its vCPUs' first write (QEMU's reset), read back
  ram:  QMP migrate (return-path, pause-before-switchover) - a refused plan or a failed pre-flight moved nothing
  switchover: at pre-switchover, once more: applied, verified, no failed write -> migrate-continue, else cancel
  commit: the destination agent reports its vCPUs running the planned registers (read back at the first KVM_RUN)
        -> the source QEMU quits. Any failure before that: the source guest resumes (QEMU with return-path
        resumes by itself when the destination fails; a held switchover is cancelled and continued here).

Why QEMU's stream does not go through the daemons' mutual-TLS link: it is QEMU's to carry (multifd, postcopy,
its return path); a proxy would add a copy and a hop to every page and could not see into QEMU's own TLS.
QEMU encrypts it itself (migration parameter tls-creds, with the cluster's CA); the daemons guard what they
own: the plan, the vCPU state and the commit.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import trio

from ...protocol import agentwire as W
from ...protocol import schemas as S
from ...protocol.negotiate import negotiate
from ...protocol.program import ProgramError, compile_plan
from ..apply import ApplyError, apply_vm
from ..readback import plan_deviations
from ..journal import Journal, MigrationRecord
from ..kvm.backend import VcpuInit
from ..logs import kv
from ..vmprofile import vm_profile
from .hub import AgentHub, VmmRecord

log = logging.getLogger("invariantd.vmm")

QUERY_INTERVAL = 0.1
EVENT_WAIT = 0.5          # seconds without a MIGRATION event before the switchover wait asks query-migrate
STATUS_INTERVAL = 1.0     # seconds between the destination status asks during QEMU's RAM phase (fresh: <= 2 s)
KEEP_INCOMING = 256             # prepared incoming migrations remembered (their QMP path, for status)


class VmmError(Exception):
    """A VMM migration step failed. kind: an rpc.capnp ErrorKind name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


# --- QMP (the qemu.qmp package; its synchronous client runs one session per worker thread) ---------------------
def _qmp_session(path: str, steps: Callable[[Any], Any], timeout: float) -> Any:
    from qemu.qmp.legacy import QEMUMonitorProtocol
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        q = QEMUMonitorProtocol(path)
        q.settimeout(timeout)
        q.connect()
        try:
            return steps(q)
        finally:
            q.close()
    finally:
        asyncio.set_event_loop(None)
        loop.close()


async def qmp(path: str, steps: Callable[[Any], Any], timeout: float = 10.0) -> Any:
    """Run steps(q) on a QMP connection to `path` (q.cmd(name, **args) returns the result, raises on an error)."""
    try:
        return await trio.to_thread.run_sync(_qmp_session, path, steps, timeout)
    except (OSError, EOFError) as e:
        raise VmmError("unreachable", f"QMP {path}: {e}") from None
    except Exception as e:              # qemu.qmp's ExecuteError, ConnectError, ...: typed for the caller
        if type(e).__module__.startswith("qemu.qmp"):
            # no QEMU there (yet, or any more) vs QEMU refusing a command
            kind = "unreachable" if type(e).__name__ in ("ConnectError", "StateError", "EOFError") else \
                "migrationFailed"
            raise VmmError(kind, f"QMP {path}: {e}") from None
        raise


def _next_status(q, deadline: float) -> tuple[str | None, float | None]:
    """The migration's next status on this QMP session: from QEMU's MIGRATION event as it is emitted (capability
    `events`: no polling delay between QEMU pausing the guest at pre-switchover and our answer, and no query
    traffic competing with the migration for the CPU), or from query-migrate after EVENT_WAIT without an
    event (a QEMU or a session that sends none). -> (status, the event's QEMU timestamp in seconds since the
    epoch, None when asked); status None: some other event."""
    try:
        ev = q.pull_event(wait=float(max(0.001, min(EVENT_WAIT, deadline - time.monotonic()))))
    except (asyncio.TimeoutError, TimeoutError):
        return q.cmd("query-migrate").get("status"), None
    if ev and ev.get("event") == "MIGRATION":
        ts = ev.get("timestamp") or {}
        at = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6 if ts.get("seconds") else None
        return (ev.get("data") or {}).get("status"), at
    return None, None


def _caps(q, names, on=True):
    q.cmd("migrate-set-capabilities", capabilities=[{"capability": n, "state": on} for n in names])


# --- the VM's profile from its agent -------------------------------------------------------------------------------
def profile_from_agent(rec: VmmRecord, backend, policy) -> S.VmProfile:
    """The negotiation input from a source agent's snapshots: every vCPU's ID-like values as QEMU's guest sees them,
    the full register list of vCPU 0, the init features QEMU asked for; what this host's CPUs and kernel are."""
    if not rec.snapshots:
        raise VmmError("notFound", f"VMM pid {rec.pid} (VM {rec.vm!r}) has not reported its registers yet: they are "
                                   f"read before its first vCPU runs (is it started by invariantd-qemu?)")
    first = rec.snapshots[min(rec.snapshots)]
    bits = tuple(b for b in range(32) if first.features >> b & 1)
    regsets = {i: list(s.values) for i, s in rec.snapshots.items()}
    prof = vm_profile(rec.vm, VcpuInit(0, bits), regsets, backend, policy)
    return S.VmProfile(prof.name, prof.revision, prof.features, prof.values, tuple(first.reg_list),
                       prof.target_impls, prof.seen_midrs, prof.source_kernel)


#: query-migrate states in which the destination cannot have the guest's device state, let alone run it
BEFORE_SWITCHOVER = frozenset({None, "none", "setup", "active", "pre-switchover", "failed", "cancelled",
                               "cancelling"})


def status_of(rec: VmmRecord | None) -> dict:
    """What the source waits on: the destination agent's program, its read-backs, its failures."""
    if rec is None:
        return {"agent": None, "applied": False, "running": False, "failed": []}
    d = rec.as_dict()
    return {"agent": d, "applied": rec.verified(1), "running": rec.verified(2),
            "failed": [e for e in d["events"] if e["kind"] == "decision" and e["action"] == "FAIL"]}


@dataclass
class Incoming:
    migration: str
    vm: str
    digest: bytes
    qmp: str = ""
    started: float = field(default_factory=time.time)


class VmmService:
    """Both sides of a VMM migration. `peer_call(peer, method, *args)` calls a peer daemon's RPC;
    `peer_caps(peer)` returns its HostCapabilities."""

    def __init__(self, hub: AgentHub, *, backend, host: S.HostCapabilities | None, policy, metrics=None,
                 apply_timeout: float = 60.0, journal: Journal | None = None) -> None:
        self.hub, self.backend, self.host, self.policy, self.metrics = hub, backend, host, policy, metrics
        self.apply_timeout = apply_timeout
        self.journal = journal if journal is not None else Journal()
        self.incoming: dict[str, Incoming] = {}

    # --- destination ----------------------------------------------------------------------------------------------
    async def prepare(self, vm: str, migration: str, profile: S.VmProfile, digest: bytes) -> dict:
        if self.host is None:
            raise VmmError("refused", "this host is not arm64: it cannot take an arm64 VM")
        plan = negotiate(profile, self.host, self.policy)
        if not plan.migratable:
            raise VmmError("refused", "refused here: " + "; ".join(
                f"{e.register}{'.' + e.field if e.field else ''}: {e.reason}" for e in plan.entries
                if e.verdict.value == "refuse")[:2000])
        if plan.digest != digest:
            raise VmmError("refused", f"plan digest mismatch (source {digest.hex()[:16]}, destination "
                                      f"{plan.digest.hex()[:16]}): the daemons disagree on the plan")
        feats = profile_features(profile)
        trial_prog = compile_plan(plan, profile)
        try:
            trial = await trio.to_thread.run_sync(
                lambda: apply_vm(self.backend, {0: list(profile.values)}, trial_prog, features=feats))
        except ApplyError as e:
            raise VmmError("kvm", f"pre-flight on a scratch VM failed: {e}") from None
        try:
            bad = [str(m) for m in trial.mismatches] + plan_deviations(plan, trial.written[0], trial.dropped[0])
        finally:
            trial.close()
        if bad:
            raise VmmError("kvm", "pre-flight: " + "; ".join(bad[:6]))
        try:
            program = compile_plan(plan, profile, migration=migration[:63], for_agent=True)
            self.hub.offer(migration, program, vm=vm)
        except ProgramError as e:
            raise VmmError("internal", f"the plan cannot be compiled for the agent: {e}") from None
        self.incoming[migration] = Incoming(migration, vm, plan.digest)
        self.journal.begin(migration, vm, "vmm-destination", "", plan.digest, "prepared")
        for old in list(self.incoming)[:-KEEP_INCOMING]:          # bounded: the oldest records go first
            del self.incoming[old]
        log.info("VMM migration planned here %s: %d registers, cap 239 %s; waiting for its QEMU",
                 kv(migration=migration, vm=vm), len(program.ops), "on" if program.enable_cap239 else "off")
        return {"migration": migration, "digest": plan.digest.hex(), "registers": len(program.ops),
                "enable_cap239": program.enable_cap239,
                "listed": [r.reg_id for r in program.listed()]}

    async def listen(self, migration: str, qmp_path: str, uri: str) -> dict:
        inc = self.incoming.get(migration)
        if inc is None:
            raise VmmError("notFound", f"no VMM migration {migration!r} was prepared here")
        inc.qmp = qmp_path
        self.journal.step(migration, "incoming")
        self.journal.set_qmp(migration, qmp_path)

        def steps(q):
            _caps(q, ["return-path"])
            q.cmd("migrate-incoming", uri=uri)
            return q.cmd("query-status")
        # the orchestrator may have started that QEMU a moment ago: its QMP socket may not be there yet
        with trio.move_on_after(self.apply_timeout):
            while True:
                try:
                    st = await qmp(qmp_path, steps)
                    return {"migration": migration, "status": st}
                except VmmError as e:
                    if e.kind != "unreachable":
                        raise
                    last = e
                await trio.sleep(0.5)
        raise VmmError("unreachable", f"the destination QEMU: {last.message}")

    async def status(self, migration: str) -> dict:
        inc = self.incoming.get(migration)
        if inc is None:                      # prepared by a previous process of this daemon: the journal knows
            rec = self.journal.migration(migration)
            if rec is not None and rec.role == "vmm-destination":
                inc = Incoming(migration, rec.vm, bytes.fromhex(rec.digest), rec.qmp)
        rec = self.hub.find(migration=migration, role=W.Role.DESTINATION)
        out = status_of(rec)
        out["qemu"] = None
        if inc is not None and inc.qmp:
            try:
                out["qemu"] = await qmp(inc.qmp, lambda q: q.cmd("query-status"), timeout=3.0)
            except VmmError as e:
                out["qemu"] = {"status": "unreachable", "error": e.message}
        return out

    # --- source --------------------------------------------------------------------------------------------------------
    async def run_source(self, mig, vm: str, peer: str, qmp_path: str, uri: str, dest_qmp: str, *,
                         peer_caps: Callable[[str], Awaitable[S.HostCapabilities | None]],
                         peer_call: Callable[..., Awaitable[Any]], apply_timeout: float, commit_timeout: float
                         ) -> None:
        """One migration; `mig` (rpc.Migration) carries phase, plan_digest, state. Raises VmmError; before RAM
        moved nothing needs undoing, after it the source resumes unless the destination runs the VM."""
        rec = self.hub.find(vm=vm, role=W.Role.SOURCE)
        if rec is None:
            raise VmmError("notFound", f"no VMM agent reported a VM named {vm!r} here (start QEMU with "
                                       f"invariantd-qemu and -name {vm})")
        mig.phase = "plan"
        profile = profile_from_agent(rec, self.backend, self.policy)
        host = await peer_caps(peer)
        if host is None:
            raise VmmError("refused", f"peer {peer} is not an arm64 host")
        plan = negotiate(profile, host, self.policy)
        mig.plan_digest = plan.digest
        if self.metrics is not None:
            self.metrics.record_verdicts(e.verdict.value for e in plan.entries if not e.field)
        if not plan.migratable:
            raise VmmError("refused", "plan refused: " + "; ".join(
                f"{e.register}{'.' + e.field if e.field else ''}: {e.reason}" for e in plan.entries
                if e.verdict.value == "refuse")[:2000])
        mig.phase = "preflight"
        self.journal.begin(mig.id, vm, "vmm-source", peer, plan.digest, "preflight", qmp=qmp_path)
        try:
            await self._run_source(mig, vm, peer, qmp_path, uri, dest_qmp, plan, profile, peer_call, apply_timeout,
                                   commit_timeout)
        except BaseException as e:
            if self.journal.migration(mig.id) and self.journal.migration(mig.id).outcome == "open":
                self.journal.decide(mig.id, "in-doubt" if mig.result == "in-doubt" else "aborted",
                                    f"{type(e).__name__}: {e}")
            raise
        self.journal.decide(mig.id, "committed")

    async def _run_source(self, mig, vm, peer, qmp_path, uri, dest_qmp, plan, profile, peer_call, apply_timeout,
                          commit_timeout) -> None:
        await peer_call(peer, "prepare_vmm", vm, mig.id, S.vm_to_bytes(profile), plan.digest)
        if dest_qmp:
            await peer_call(peer, "incoming_vmm", mig.id, dest_qmp, listen_uri(uri))
        mig.phase = "agent"
        first = await self._until(peer_call, peer, mig.id, "applied", apply_timeout,
                                  "the destination QEMU's agent did not report the plan applied and read back", mig)
        mig.phase = "ram"
        self.journal.step(mig.id, "ram")
        resumed = False
        try:
            st = await self._ram_and_switchover(mig, qmp_path, uri, peer_call, peer, apply_timeout, first)
            mig.detail = {**mig.detail, "qemu": {k: st.get(k) for k in ("status", "total-time", "downtime",
                                                                         "setup-time", "error-desc") if k in st}}
            if st.get("refused"):
                raise VmmError("migrationFailed", f"switchover refused: {st['refused']}")
            if st["status"] != "completed":
                raise VmmError("migrationFailed", f"QEMU migration {st['status']}: {st.get('error-desc', '')}")
            mig.phase = "commit"
            self.journal.step(mig.id, "completed")
            d = await self._until(peer_call, peer, mig.id, "running", commit_timeout, "", mig)
            if d is None or not d["running"]:
                q = (d or {}).get("qemu") or {}
                if q.get("status") == "running":
                    log.warning("VMM migration %s: the destination QEMU runs but its agent reported no read-back; "
                                "committing on QEMU's word", kv(migration=mig.id, vm=mig.vm, peer=peer))
                else:
                    raise VmmError("migrationFailed", f"the destination never ran the VM (QEMU {q.get('status')})")
            self.journal.step(mig.id, "quit")     # before: a restarted daemon finding no source QEMU knows why
            try:
                await qmp(qmp_path, lambda q: q.cmd("quit"))
            except VmmError:
                pass                        # QEMU may close QMP before it answers `quit`: it is going away
            mig.phase = "done"
        except BaseException:
            with trio.CancelScope(shield=True):
                resumed = await self._resume_source(qmp_path, peer_call, peer, mig.id)
            if not resumed:
                mig.state, mig.result = "inDoubt", "in-doubt"
            raise

    async def _ram_and_switchover(self, mig, qmp_path, uri, peer_call, peer, timeout, first: dict) -> dict:
        """QEMU's migration on one QMP session in one worker thread (its MIGRATION events, _next_status: the guest
        is paused from pre-switchover on, so any delay in noticing it is downtime), while a trio task keeps the
        destination's status fresh (every STATUS_INTERVAL: each ask costs both hosts CPU the migration wants).
        At pre-switchover the freshest status decides at once: applied, read back, no refused write (QEMU writes
        no vCPU register on the destination before the switchover, so a status taken during the RAM phase is the
        state at the switchover) -> migrate-continue; else migrate_cancel. -> the final query-migrate, with
        "refused": why, when the switchover was refused."""
        import threading
        latest: dict = {"d": first, "at": time.monotonic()}
        lock = threading.Lock()
        done = trio.Event()

        async def watch() -> None:
            while not done.is_set():
                try:
                    d = await peer_call(peer, "vmm_status", mig.id)
                except VmmError as e:
                    d = {"applied": False, "failed": [], "error": e.message}
                with lock:
                    latest.update(d=d, at=time.monotonic())
                mig.detail = {**mig.detail, "destination": d}
                with trio.move_on_after(STATUS_INTERVAL):
                    await done.wait()

        def drive(q) -> dict:
            _caps(q, ["return-path", "pause-before-switchover", "events"])
            q.cmd("migrate", uri=uri)
            deadline = time.monotonic() + timeout * 10
            continued = False
            while time.monotonic() < deadline:
                status, at_qemu = _next_status(q, deadline)
                if status in ("completed", "failed", "cancelled"):
                    return q.cmd("query-migrate")
                if status != "pre-switchover" or continued:
                    continue
                mig.phase = "switchover"
                held, held_wall = time.monotonic(), time.time()
                while True:     # the freshest status; a stale one (the peer slow to answer) gets 3 s
                    with lock:
                        d, at = latest.get("d") or {}, latest.get("at", 0.0)
                    if time.monotonic() - at <= 2.0 or time.monotonic() - held > 3.0:
                        break
                    time.sleep(0.01)
                why = ("no fresh destination status" if time.monotonic() - at > 2.0 else
                       f"failed writes {d['failed'][:3]}" if d.get("failed") else
                       "the destination agent reports no verified apply" if not d.get("applied") else "")
                if why:
                    q.cmd("migrate_cancel")
                    return {**q.cmd("query-migrate"), "refused": why}
                decided = time.monotonic()
                self.journal.step(mig.id, "switchover")   # from here the destination may run the guest
                journaled = time.monotonic()
                q.cmd("migrate-continue", state="pre-switchover")
                continued = True
                # what the held switchover added to QEMU's downtime, in ms: QEMU's pre-switchover event -> noticed
                # here (None: found by query-migrate), -> decided, -> journaled, -> migrate-continue answered
                mig.detail = {**mig.detail, "switchover": {
                    "noticed": None if at_qemu is None else round((held_wall - at_qemu) * 1e3, 1),
                    "decided": round((decided - held) * 1e3, 1), "journal": round((journaled - decided) * 1e3, 1),
                    "continue": round((time.monotonic() - journaled) * 1e3, 1)}}
            raise VmmError("migrationFailed", f"QEMU's migration did not finish within {timeout * 10:.0f} s")

        async with trio.open_nursery() as n:
            n.start_soon(watch)
            try:
                return await qmp(qmp_path, drive, timeout=timeout)
            finally:
                done.set()

    async def _until(self, peer_call, peer, mid, key, timeout, why, mig=None):
        deadline = trio.current_time() + timeout
        d = None
        while trio.current_time() < deadline:
            d = await peer_call(peer, "vmm_status", mid)
            if mig is not None:
                mig.detail = {**mig.detail, "destination": d}
            if d["failed"]:
                raise VmmError("kvm", f"the destination agent failed a write: {d['failed'][:3]}")
            if d[key]:
                return d
            await trio.sleep(QUERY_INTERVAL)
        if why:
            raise VmmError("migrationFailed", f"{why} within {timeout:.0f} s")
        return d

    async def _source_state(self, qmp_path, want, timeout) -> dict:
        with trio.fail_after(timeout):
            while True:
                st = await qmp(qmp_path, lambda q: q.cmd("query-migrate"))
                if st.get("status") in want:
                    return st
                await trio.sleep(QUERY_INTERVAL)

    async def settle_source(self, rec: MigrationRecord, peer_call) -> tuple[str, str]:
        """An in-doubt QEMU migration this daemon was the source of (its journal row): ask the source QEMU and the
        destination daemon, act, and say what was done: resumed (the source guest runs again) | committed (the
        destination runs it; the source QEMU is told to quit) | lost | wait (`why` names what it waits for).
        Before the switchover the destination cannot run the guest, so the source resumes; after it, the source
        resumes only when the destination's QEMU is known not to have the guest running."""
        mid, where = rec.id, kv(migration=rec.id, vm=rec.vm, peer=rec.peer)
        try:
            dest = await peer_call(rec.peer, "vmm_status", mid)
        except Exception as e:             # noqa: BLE001 - any failure to ask is "cannot ask"
            dest, why_not = None, str(getattr(e, "message", e))
        else:
            why_not = ""
        dq = ((dest or {}).get("qemu") or {}).get("status")
        dest_runs = dq == "running" or bool((dest or {}).get("running"))
        try:
            src, run = await qmp(rec.qmp, lambda q: (q.cmd("query-migrate").get("status"),
                                                     q.cmd("query-status").get("status")), timeout=5.0)
        except VmmError as e:
            if dest_runs or rec.phase == "quit":
                self.journal.decide(mid, "committed", "the source QEMU is gone; the destination runs the guest")
                return "committed", "the source QEMU is gone and the destination runs the guest"
            if dest is None:
                return "wait", f"the source QEMU is gone ({e.message}) and {rec.peer} cannot be asked ({why_not})"
            self.journal.decide(mid, "lost", f"the source QEMU is gone ({e.message}); the destination's QEMU is {dq}")
            return "lost", f"the source QEMU is gone and the destination's QEMU is {dq or 'unknown'}"
        if run == "running":
            self.journal.decide(mid, "aborted", "the source QEMU runs the guest")
            return "resumed", "the source QEMU runs the guest"
        if dest_runs:
            self.journal.step(mid, "quit")
            try:
                await qmp(rec.qmp, lambda q: q.cmd("quit"))
            except VmmError:
                pass
            self.journal.decide(mid, "committed", "the destination runs the guest: the source QEMU quit")
            return "committed", "the destination runs the guest: the source QEMU was told to quit"
        if src not in BEFORE_SWITCHOVER:       # device (the switchover under way) or completed
            if dest is None:
                return "wait", (f"the source QEMU's migration is {src} and {rec.peer} cannot be asked whether its QEMU "
                                f"runs the guest ({why_not})")
            if src != "completed":
                return "wait", f"the source QEMU's migration is {src} (the switchover is under way)"
            return "wait", (f"the destination QEMU holds the whole guest but is {dq or 'not reachable there'}: run it "
                            f"there (cont) or quit it, then this settles")
        def resume(q):
            if src in ("active", "pre-switchover", "device", "setup"):
                q.cmd("migrate_cancel")
            if q.cmd("query-status").get("status") != "running":
                q.cmd("cont")
        try:
            await qmp(rec.qmp, resume, timeout=5.0)
        except VmmError as e:
            return "wait", f"could not resume the source QEMU: {e.message}"
        self.journal.decide(mid, "aborted", f"resumed the source guest (its migration was {src} before the "
                                            f"switchover)")
        log.warning("VMM migration settled %s: the source guest resumed (migration %s)", where, src)
        return "resumed", f"the source guest resumed (its migration was {src}, before the switchover)"

    async def _resume_source(self, qmp_path, peer_call, peer, mid) -> bool:
        """After a failure: the source guest runs again unless the destination runs it or may. True = resolved;
        False = in doubt: the source QEMU stays paused (its migration completed, so the destination QEMU holds the
        whole guest, and the destination daemon cannot be asked whether it runs it)."""
        try:
            dest = await peer_call(peer, "vmm_status", mid)
        except Exception:
            dest = None
        dq = ((dest or {}).get("qemu") or {}).get("status")
        where = kv(migration=mid, peer=peer)
        if dq == "running" or (dest or {}).get("running"):
            log.error("VMM migration failed after the destination started the VM %s: the source stays paused", where)
            return True
        try:
            src = await qmp(qmp_path, lambda q: q.cmd("query-migrate").get("status"))
        except Exception as e:
            log.error("VMM migration in doubt %s: the source QEMU cannot be asked (%s): it stays as it is", where, e)
            return False
        if src == "completed" and dest is None:
            log.error("VMM migration in doubt %s: the source QEMU completed its migration and the destination daemon "
                      "cannot be asked whether its QEMU runs the guest: the source stays paused (vmm-status on both, "
                      "then quit one QEMU)", where)
            return False
        try:
            def resume(q):
                st = q.cmd("query-migrate").get("status")
                if st in ("active", "pre-switchover", "device", "setup"):
                    q.cmd("migrate_cancel")
                run = q.cmd("query-status")
                if run.get("status") != "running":
                    q.cmd("cont")
                return q.cmd("query-status")
            st = await qmp(qmp_path, resume)
            log.warning("VMM migration failed %s: the source guest resumed (%s)", where, st.get("status"))
            return True
        except Exception as e:
            log.error("VMM migration in doubt %s: could not resume the source QEMU: %s", where, e)
            return False


def profile_features(profile: S.VmProfile) -> tuple[int, ...]:
    from ...protocol import kvmabi
    return tuple(kvmabi.VCPU_FEATURES[f] for f in profile.features if f in kvmabi.VCPU_FEATURES)


def listen_uri(uri: str) -> str:
    """The destination's -incoming URI for the source's migrate URI: tcp:HOST:PORT -> tcp:0.0.0.0:PORT."""
    if uri.startswith("tcp:"):
        return "tcp:0.0.0.0:" + uri.rsplit(":", 1)[1]
    return uri
