"""The daemon's side of the VMM agents' unix socket (protocol/agentwire.py; the agent: daemon/vmm/agent.c).

    hub = AgentHub(path, metrics)
    nursery.start(hub.serve)            # listens; one task per agent connection
    hub.offer(migration_id, program)    # the agreed plan, compiled (protocol/program.compile_plan(for_agent=True))
    hub.vmms()                          # every agent seen: pid, role, VM name, snapshots, decisions, read-backs

A source agent reports each vCPU's register list and ID-like values before the vCPU first runs (the guest's real
view, from which the plan is made: profile()); a destination agent asks for the program of its migration and
reports every decision and read-back. One agent that misbehaves is dropped with one log line naming why; the
daemon and the other agents go on.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
from dataclasses import dataclass, field

import trio

from ...protocol import agentwire as W
from ...protocol.catalog import catalog
from ...protocol.kvmabi import errno_name
from ...protocol.program import Action, ApplyProgram, Verdict8
from ..apply import EventAction

log = logging.getLogger("invariantd.vmm")


@dataclass
class VmmRecord:
    """What one agent (one VMM process) told this daemon."""
    pid: int
    uid: int
    role: W.Role = W.Role.UNKNOWN
    vm: str = ""
    migration: str = ""
    connected: bool = True
    program_digest: bytes = b""
    refused: str = ""                                        # why it got no program
    snapshots: dict[int, W.Snapshot] = field(default_factory=dict)
    events: list[W.Event] = field(default_factory=list)
    verify: dict[tuple[int, int], W.Verify] = field(default_factory=dict)     # (vcpu, phase) -> read-back

    def verified(self, phase: int = 1) -> bool:
        """Every vCPU that reported a read-back in this phase read the planned values, and none failed a write."""
        vs = [v for (_, p), v in self.verify.items() if p == phase]
        return bool(vs) and all(not v.bad for v in vs) and not self.failures()

    def failures(self) -> list[W.Event]:
        return [e for e in self.events if e.kind is W.Kind.DECISION and e.action == Action.FAIL]

    def as_dict(self) -> dict:
        cat = catalog()

        def ev(e: W.Event) -> dict:
            return {"vcpu": e.vcpu, "kind": e.kind.name.lower(), "register": cat.name(e.reg_id) if e.reg_id > 0xffff
                    else e.reg_id, "errno": os.strerror(e.errno) if e.errno else "", "action": Action(e.action).name
                    if e.kind is W.Kind.DECISION else "", "verdict": Verdict8(e.verdict).name.lower(),
                    "given": f"{e.given:#x}", "final": f"{e.final:#x}"}
        return {"pid": self.pid, "uid": self.uid, "role": self.role.name.lower(), "vm": self.vm,
                "migration": self.migration, "connected": self.connected,
                "program_digest": self.program_digest.hex(), "refused": self.refused,
                "vcpus_snapshotted": sorted(self.snapshots), "events": [ev(e) for e in self.events],
                "verify": [{"vcpu": v.vcpu, "phase": v.phase, "checked": v.checked,
                            "bad": [{"register": cat.name(r), "want": f"{w:#x}", "got": f"{g:#x}", "errno": er}
                                    for r, w, g, er in v.bad]} for v in self.verify.values()]}


def _peer_cred(sock: trio.socket.SocketType) -> tuple[int, int]:
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid, uid
    except OSError:
        return 0, -1


class AgentHub:
    MAX_AGENTS = 256            # connected at once
    KEEP_GONE = 256             # records of agents that disconnected (a libvirt capability probe is one too)

    def __init__(self, path: str, metrics=None, *, mode: int = 0o660, hold: float = 30.0) -> None:
        """hold: how long a destination agent's request waits for its program to be offered (the orchestrator may
        start the destination QEMU before the daemons agreed on the plan); then NO_PROGRAM."""
        self.path, self.metrics, self.mode, self.hold = path, metrics, mode, hold
        self._programs: dict[str, tuple[str, ApplyProgram]] = {}     # migration -> (VM name, program)
        self._vmms: dict[int, VmmRecord] = {}
        self._changed = trio.Event()
        self._open = 0

    # --- what the daemon's migration code uses ------------------------------------------------------------------
    def offer(self, migration: str, program: ApplyProgram, vm: str = "") -> None:
        """The program a destination agent of `migration` receives - or, when the VMM was started without
        INVARIANTD_MIGRATION (e.g. by libvirt), of the VM named `vm`. Encoded once here: a program that cannot go
        to an agent raises ProgramError now, not in front of the VMM."""
        program.encode()
        self._programs[migration] = (vm, program)
        for old in list(self._programs)[:-self.KEEP_GONE]:      # bounded: the oldest offers go first
            del self._programs[old]
        self._touch()

    def withdraw(self, migration: str) -> None:
        self._programs.pop(migration, None)

    def vmms(self) -> list[VmmRecord]:
        return list(self._vmms.values())

    def find(self, *, vm: str | None = None, migration: str | None = None, role: W.Role | None = None
             ) -> VmmRecord | None:
        for r in reversed(list(self._vmms.values())):
            if (vm is None or r.vm == vm) and (migration is None or r.migration == migration) and \
                    (role is None or r.role is role):
                return r
        return None

    async def wait_for(self, predicate, timeout: float):
        """Wait until predicate(hub) returns something truthy (re-checked on every agent message); return it.
        Raises trio.TooSlowError."""
        with trio.fail_after(timeout):
            while True:
                got = predicate(self)
                if got:
                    return got
                ev = self._changed
                await ev.wait()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- serving ---------------------------------------------------------------------------------------------------
    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        try:
            os.unlink(self.path)                # a stale socket of an earlier run
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(self.path)
        os.chmod(self.path, self.mode)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        task_status.started(self.path)
        try:
            await trio.serve_listeners(self._handle, [listener])
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _handle(self, stream: trio.SocketStream) -> None:
        pid, uid = _peer_cred(stream.socket)
        if self._open >= self.MAX_AGENTS:
            log.warning("VMM agent pid %d refused: %d agents already connected", pid, self._open)
            await stream.aclose()
            return
        self._open += 1
        rec: VmmRecord | None = None
        reader = W.Reader()
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    for msg in reader.feed(data):
                        rec = await self._on(stream, pid, uid, rec, msg)
        except W.WireError as e:
            log.error("VMM agent pid %d: malformed frame (%s); connection closed", pid, e)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.info("VMM agent pid %d: connection lost (%s)", pid, e)
        finally:
            self._open -= 1
            if rec is not None:
                rec.connected = False
                gone = [pid for pid, r in self._vmms.items() if not r.connected]
                for pid in gone[:-self.KEEP_GONE]:
                    del self._vmms[pid]
                self._touch()

    async def _on(self, stream, pid: int, uid: int, rec: VmmRecord | None, msg) -> VmmRecord:
        if isinstance(msg, W.Hello):
            rec = self._vmms.get(pid)
            if rec is None or rec.uid != uid:
                rec = self._vmms[pid] = VmmRecord(pid, uid)
            rec.role, rec.vm, rec.migration, rec.connected = msg.role, msg.vm, msg.migration, True
            log.info("VMM agent pid %d (%s, VM %r, migration %r) connected", pid, msg.role.name.lower(), msg.vm or "-",
                     msg.migration or "-")
            if msg.role is W.Role.DESTINATION:
                await self._send_program(stream, rec, msg)
            self._touch()
            return rec
        if rec is None:
            raise W.WireError(f"{type(msg).__name__} before HELLO")
        if isinstance(msg, W.Snapshot):
            rec.snapshots[msg.vcpu] = msg
        elif isinstance(msg, W.Event):
            rec.events.append(msg)
            self._record(rec, msg)
        elif isinstance(msg, W.Verify):
            rec.verify[(msg.vcpu, msg.phase)] = msg
            if msg.bad:
                cat = catalog()
                log.error("VMM pid %d (VM %r): vCPU %d read back %d planned register(s) differently: %s", rec.pid,
                          rec.vm, msg.vcpu, len(msg.bad), ", ".join(f"{cat.name(r)} wants {w:#x} reads {g:#x}"
                                                                   for r, w, g, _ in msg.bad[:4]))
        else:
            raise W.WireError(f"an agent does not send {type(msg).__name__}")
        self._touch()
        return rec

    async def _send_program(self, stream, rec: VmmRecord, hello: W.Hello) -> None:
        def lookup():
            if hello.migration:
                return self._programs.get(hello.migration, ("", None))[1]
            named = [p for vm, p in self._programs.values() if vm and vm == hello.vm]
            return named[-1] if named else None

        prog = lookup()
        with trio.move_on_after(self.hold):
            while prog is None and (hello.migration or hello.vm):
                changed = self._changed
                prog = lookup()
                if prog is None:
                    await changed.wait()
        if prog is not None and not hello.migration:
            rec.migration = next(m for m, (vm, p) in self._programs.items() if p is prog)
        why = ""
        if prog is None and not hello.migration and hello.vm:
            why = f"no migration of VM {hello.vm!r} is planned here"
        elif prog is None:
            why = (f"no migration {hello.migration!r} is planned here" if hello.migration else
                   "the VMM was started without INVARIANTD_MIGRATION")
        elif hello.digest and hello.digest != prog.digest:
            why = f"the VMM expects plan digest {hello.digest.hex()[:16]}, the agreed plan is {prog.digest.hex()[:16]}"
        if why:
            rec.refused = why
            log.warning("VMM agent pid %d (VM %r): no program: %s; it passes through", rec.pid, hello.vm, why)
            await stream.send_all(W.encode_no_program(why))
            return
        rec.program_digest = prog.digest
        await stream.send_all(W.frame(W.T.PROGRAM, prog.encode()))

    def _record(self, rec: VmmRecord, e: W.Event) -> None:
        cat = catalog()
        name = cat.name(e.reg_id)
        if e.kind is W.Kind.OVERRIDE:
            log.info("VMM pid %d vCPU %d %s: planned value %#x written instead of %#x (%s)", rec.pid, e.vcpu, name,
                     e.final, e.given, Verdict8(e.verdict).name.lower())
            if self.metrics is not None:
                self.metrics.invariant_overrides.labels(name, EventAction.OVERRIDE_PLAN).inc()
        elif e.kind is W.Kind.DECISION:
            act = Action(e.action).name.lower().replace("_", "-")
            err = errno_name(e.errno)
            if self.metrics is not None:
                self.metrics.set_one_reg_failures.labels(name, err).inc()
                if e.action in (Action.ACCEPT_DESTINATION, Action.WRITE_FALLBACK, Action.DROP):
                    self.metrics.invariant_overrides.labels(name, act).inc()
            level = logging.ERROR if e.action == Action.FAIL else logging.INFO
            log.log(level, "VMM pid %d vCPU %d %s (%#018x): KVM_SET_ONE_REG of %#x failed with %s; action %s", rec.pid,
                    e.vcpu, name, e.reg_id, e.given, err, act)
        elif e.kind is W.Kind.CAP239:
            lvl = logging.ERROR if e.errno else logging.INFO
            log.log(lvl, "VMM pid %d: KVM_CAP_ARM_WRITABLE_IMP_ID_REGS %s", rec.pid,
                    f"failed: {errno_name(e.errno)}" if e.errno else "enabled before the first vCPU")
        elif e.kind is W.Kind.PASSTHROUGH:
            log.warning("VMM pid %d refused the program and passes through", rec.pid)

