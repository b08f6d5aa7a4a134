"""The peer data plane: the I/O shell around protocol.session for both roles.

Source (migrate_out): pause the VM -> Hello -> read the destination's Capabilities -> compute the plan ->
PlanProposal -> PlanAccept -> Preflight -> stream every vCPU's registers in checksummed chunks -> StreamEnd
-> wait for the destination's Commit ("applied and verified") -> release the VM -> Commit.
Any failure before the destination's Commit resumes the VM here (it stayed paused and intact).

Destination (handle_incoming): Hello -> Capabilities -> check the plan (digest echoed in PlanAccept) ->
Preflight (trial apply of the VM-wide registers on a scratch VM) -> receive chunks -> apply (apply.py) and
verify -> adopt the VM paused -> Commit -> run it only when the source's Commit arrives. A failure before
our Commit discards the VM (closed, never run); a broken link after it leaves the VM paused "in-doubt".

Plans: until the negotiation engine's Plan is wired in, the plan travels as canonical JSON in format
PLAN_FORMAT (the ApplyPolicy plus the source's VM-wide register values and vCPU features); `planner`
(source) and `plan_checker` (destination) are the injection points for the real engine.
"""
from __future__ import annotations

import json
import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import trio

from ..protocol import session as ps
from ..protocol.errors import ProtocolError, RemoteProtocolError
from ..protocol.framing import Limits
from .apply import ApplyError, ApplyPolicy, apply_vm, read_vm, vm_wide
from .kvm.backend import Backend
from .kvm.errors import KvmError
from .metrics import Metrics
from .vms import ManagedVm, VmRegistry, VmState

log = logging.getLogger("invariantd.peer")

PLAN_FORMAT = "invariantd/apply-plan@1"
CAPS_FORMAT = "invariantd/host-capabilities@1+json"


class PeerError(Exception):
    """A migration over the peer link failed. kind: tls | protocol | aborted | plan | preflight | apply |
    timeout | closed | vm; the message says what happened and, where known, what to do."""

    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(f"{kind}: {msg}")
        self.kind = kind


@dataclass(frozen=True)
class PeerConfig:
    node: str = "invariantd"
    chunk_registers: int = 256
    checksum: str = "crc32"
    limits: Limits = Limits()
    handshake_timeout: float = 10.0
    phase_timeout: float = 30.0          # plan, preflight, each received message while streaming
    apply_timeout: float = 60.0          # destination apply + verify (source waits this long for Commit)
    commit_timeout: float = 30.0


@dataclass
class MigrationResult:
    migration_id: str
    vm_id: str
    result: str                          # committed | in-doubt
    events: list = field(default_factory=list)
    digest: bytes = b""


# --- the plan document (until the negotiation engine's Plan replaces it) -------------------------------------
def make_plan(policy: ApplyPolicy, regsets: Mapping[int, Sequence[tuple[int, int]]], features: Sequence[int],
              caps_digest: str) -> bytes:
    vm_wide_regs = {f"{r:#018x}": f"{v:#x}" for r, v in regsets[min(regsets)] if vm_wide(r)}
    doc = {"format": PLAN_FORMAT, "policy": policy.to_dict(), "vcpus": len(regsets),
           "features": sorted(features), "vm_wide": vm_wide_regs, "destination_caps_sha256": caps_digest}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class PlanDoc:
    policy: ApplyPolicy
    vcpus: int
    features: tuple[int, ...]
    vm_wide: tuple[tuple[int, int], ...]
    caps_digest: str


def parse_plan(fmt: str, plan: bytes) -> PlanDoc:
    if fmt != PLAN_FORMAT:
        raise ValueError(f"plan format {fmt!r} is not understood here (want {PLAN_FORMAT})")
    try:
        d = json.loads(plan)
        return PlanDoc(ApplyPolicy.from_dict(d["policy"]), int(d["vcpus"]), tuple(int(f) for f in d["features"]),
                       tuple((int(k, 16), int(v, 16)) for k, v in d["vm_wide"].items()),
                       str(d["destination_caps_sha256"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"malformed plan document: {e}") from None


def caps_digest(doc_bytes: bytes) -> str:
    import hashlib
    return hashlib.sha256(doc_bytes).hexdigest()


Planner = Callable[[ManagedVm, Mapping[int, Sequence[tuple[int, int]]], dict], ApplyPolicy]


def identity_planner(vm: ManagedVm, regsets, caps: dict) -> ApplyPolicy:
    """No overrides: registers must apply as they are (plus the known drift drops)."""
    return ApplyPolicy()


PlanChecker = Callable[[PlanDoc, dict], None]


def default_plan_checker(plan: PlanDoc, caps: dict) -> None:
    """Hook for the negotiation engine to recompute the plan here; raises ValueError to refuse."""


# --- the I/O shell ----------------------------------------------------------------------------------------------
class Conn:
    def __init__(self, stream: trio.abc.Stream, session: ps.Session, metrics: Metrics | None) -> None:
        self.stream, self.session, self.metrics = stream, session, metrics

    async def send(self, event) -> None:
        data = self.session.send(event)
        try:
            await self.stream.send_all(data)
        except BaseException:
            self.session.send_failed()
            raise
        if self.metrics:
            self.metrics.stream("sent", len(data))

    async def receive(self):
        while True:
            ev = self.session.next_event()
            if ev is not ps.NEED_DATA:
                return ev
            data = await self.stream.receive_some(65536)
            if self.metrics:
                self.metrics.stream("received", len(data))
            self.session.receive_data(data)

    async def expect(self, *types):
        ev = await self.receive()
        if isinstance(ev, ps.Abort):
            raise PeerError("aborted", f"peer aborted ({ev.code or 'no code'}): {ev.reason}")
        if isinstance(ev, ps.ConnectionClosed):
            raise PeerError("closed", "peer closed the connection")
        if not isinstance(ev, types):     # the session's state machine already refuses out-of-order messages
            raise PeerError("protocol", f"unexpected {type(ev).__name__}")
        return ev

    async def abort_quietly(self, reason: str, code: str) -> None:
        """Best effort: tell the peer, never raise, never block long."""
        if self.session.state in (ps.ABORTED, ps.DONE):
            return
        ab = ps.Abort(reason[:60000], code)
        with trio.move_on_after(2) as scope:
            scope.shield = True
            try:
                if self.session.state is ps.ERROR:
                    # the session is finished; a last Abort still tells the peer why (like an HTTP 400)
                    await self.stream.send_all(ps.encode(ab))
                else:
                    await self.send(ab)
            except Exception:
                pass


def _wrap(e: BaseException) -> PeerError | None:
    if isinstance(e, PeerError):
        return e
    if isinstance(e, RemoteProtocolError):
        return PeerError("protocol", f"peer broke the protocol ({e.what}): {e}")
    if isinstance(e, ProtocolError):
        return PeerError("protocol", str(e))
    if isinstance(e, trio.TooSlowError):
        return PeerError("timeout", "peer did not answer in time")
    if isinstance(e, (trio.BrokenResourceError, trio.ClosedResourceError)):
        cause = e.__cause__
        return PeerError("closed", f"connection lost{': ' + str(cause) if cause else ''} (if this is the first "
                                   f"message, the peer may have refused our certificate)")
    if isinstance(e, ApplyError):
        return PeerError("apply", str(e))
    return None


def _chunks(vm_id: str, regsets, n: int, checksum: str):
    for vcpu, regs in sorted(regsets.items()):
        for k in range(max(1, math.ceil(len(regs) / n))):
            yield ps.VcpuChunk.build(vm_id, vcpu, k, regs[k * n:(k + 1) * n], checksum)


async def migrate_out(stream: trio.abc.Stream, registry: VmRegistry, vm_id: str, *, cfg: PeerConfig = PeerConfig(),
                      metrics: Metrics | None = None, planner: Planner = identity_planner,
                      migration_id: str | None = None) -> MigrationResult:
    """Source side over an established (TLS) stream. Raises PeerError; the VM is then running here again."""
    mvm = registry.get(vm_id)
    mid = migration_id or uuid.uuid4().hex
    conn = Conn(stream, ps.Session(ps.SOURCE, cfg.limits), metrics)
    m = metrics or Metrics()
    mvm.pause()
    released = False
    try:
        with m.phase("handshake"), trio.fail_after(cfg.handshake_timeout):
            await conn.send(ps.Hello(ps.PROTOCOL_VERSIONS, ps.SOURCE, cfg.node))
            await conn.expect(ps.Hello)
            caps_ev = await conn.expect(ps.Capabilities)
        try:
            caps = json.loads(caps_ev.doc)
        except ValueError as e:
            raise PeerError("protocol", f"destination capabilities are not JSON: {e}") from None
        with m.phase("plan"), trio.fail_after(cfg.phase_timeout):
            try:
                regsets = read_vm(mvm.vcpus)
            except KvmError as e:
                raise PeerError("vm", f"cannot read the source VM: {e}") from None
            policy = planner(mvm, regsets, caps)
            plan = make_plan(policy, regsets, mvm.init.features if mvm.init else (), caps_digest(caps_ev.doc))
            prop = ps.PlanProposal(mid, vm_id, len(regsets), PLAN_FORMAT, plan)
            await conn.send(prop)
            await conn.expect(ps.PlanAccept)
        with m.phase("preflight"), trio.fail_after(cfg.apply_timeout):
            pf = await conn.expect(ps.Preflight)
        if not pf.ok:
            raise PeerError("preflight", f"destination refused the plan in pre-flight: {pf.detail}")
        with m.phase("stream"):
            for chunk in _chunks(vm_id, regsets, cfg.chunk_registers, cfg.checksum):
                with trio.fail_after(cfg.phase_timeout):
                    await conn.send(chunk)
            end = conn.session.stream_end()
            await conn.send(end)
        with m.phase("apply"), trio.fail_after(cfg.apply_timeout):
            await conn.expect(ps.Commit)
        with m.phase("commit"):
            mvm.release()              # never runnable here again: the destination may now run it
            released = True
            try:
                with trio.fail_after(cfg.commit_timeout):
                    await conn.send(ps.Commit(mid, end.digest))
            except BaseException as e:
                m.migration("in-doubt")
                log.error("migration %s of %s: released, but our Commit may not have arrived (%s); the destination "
                          "keeps the VM paused in-doubt", mid, vm_id, e)
                raise PeerError("in-doubt", f"VM {vm_id} released; destination may hold it paused in-doubt: "
                                            f"{_wrap(e) or e}") from e
        m.migration("committed")
        return MigrationResult(mid, vm_id, "committed", [], end.digest)
    except BaseException as e:
        if released:
            raise
        mvm.resume()                   # the VM never left: keep running here
        err = _wrap(e)
        await conn.abort_quietly(str(err or e), err.kind if err else "source")
        m.migration("aborted")
        log.warning("migration %s of %s aborted, VM resumed here: %s", mid, vm_id, err or repr(e))
        if err is not None and err is not e:
            raise err from e
        raise


async def handle_incoming(stream: trio.abc.Stream, peer: str, *, backend: Backend, registry: VmRegistry,
                          caps_doc: dict, cfg: PeerConfig = PeerConfig(), metrics: Metrics | None = None,
                          plan_checker: PlanChecker = default_plan_checker) -> MigrationResult | None:
    """Destination side of one connection. Returns the result, or None when the migration did not complete
    (the reason is logged and was sent to the source)."""
    conn = Conn(stream, ps.Session(ps.DESTINATION, cfg.limits), metrics)
    m = metrics or Metrics()
    result = None
    mvm: ManagedVm | None = None
    committed = False
    try:
        with m.phase("handshake"), trio.fail_after(cfg.handshake_timeout):
            await conn.expect(ps.Hello)
            await conn.send(ps.Hello(ps.PROTOCOL_VERSIONS, ps.DESTINATION, cfg.node))
            doc = json.dumps(caps_doc, sort_keys=True, separators=(",", ":")).encode()
            await conn.send(ps.Capabilities(CAPS_FORMAT, doc))
        with m.phase("plan"), trio.fail_after(cfg.phase_timeout):
            prop = await conn.expect(ps.PlanProposal)
            try:
                plan = parse_plan(prop.format, prop.plan)
                if plan.caps_digest != caps_digest(doc):
                    raise ValueError("the plan was computed against other capabilities than ours")
                if plan.vcpus != prop.vcpus:
                    raise ValueError(f"plan says {plan.vcpus} vCPUs, proposal {prop.vcpus}")
                plan_checker(plan, caps_doc)
            except ValueError as e:
                raise PeerError("plan", f"plan refused: {e}") from None
            await conn.send(ps.PlanAccept(prop.migration_id, prop.digest))
        with m.phase("preflight"), trio.fail_after(cfg.apply_timeout):
            try:
                trial = await trio.to_thread.run_sync(
                    lambda: apply_vm(backend, {0: list(plan.vm_wide)}, plan.policy, features=plan.features or None))
                trial.close()               # trial events go to the source in Preflight, not to metrics
                bad = [str(x) for x in trial.mismatches]
                ok, detail = not bad, "; ".join(bad) or "ok"
                evs = tuple(f"{e.register} {e.errno} {e.action}" for e in trial.events)
            except ApplyError as e:
                ok, detail, evs = False, str(e), tuple(f"{x.register} {x.errno} {x.action}" for x in e.events)
            await conn.send(ps.Preflight(ok, detail, evs))
            if not ok:
                ev = await conn.receive()          # the source aborts; anything else is its problem
                raise PeerError("preflight", f"pre-flight failed: {detail}" + (
                    "" if isinstance(ev, ps.Abort) else f" (source sent {type(ev).__name__})"))
        regsets: dict[int, list[tuple[int, int]]] = {}
        with m.phase("stream"):
            while True:
                with trio.fail_after(cfg.phase_timeout):
                    ev = await conn.expect(ps.VcpuChunk, ps.StreamEnd)
                if isinstance(ev, ps.StreamEnd):
                    break
                regsets.setdefault(ev.vcpu, []).extend(ev.registers())
        with m.phase("apply"), trio.fail_after(cfg.apply_timeout):
            res = await trio.to_thread.run_sync(
                lambda: apply_vm(backend, regsets, plan.policy, features=plan.features or None))
            m.record_apply_events(res.events)
            if not res.ok:
                res.close()
                raise PeerError("apply", "read-back differs: " + "; ".join(str(x) for x in res.mismatches[:8]))
            mvm = registry.adopt(prop.vm_id, res.vm, res.vcpus, None, VmState.INCOMING)
        with m.phase("commit"):
            digest = conn.session.stream_digest
            await conn.send(ps.Commit(prop.migration_id, digest))
            committed = True
            with trio.fail_after(cfg.commit_timeout):
                await conn.expect(ps.Commit)
            mvm.resume()                     # the source released it: this host runs the VM now
        m.migration("committed")
        log.info("migration %s: VM %s from %s committed", prop.migration_id, prop.vm_id, peer)
        result = MigrationResult(prop.migration_id, prop.vm_id, "committed", res.events, digest)
        return result
    except BaseException as e:
        err = _wrap(e)
        if mvm is not None and committed:
            mvm.in_doubt()                   # the source may have released it: keep it paused, never discard
            m.migration("in-doubt")
            log.error("VM %s from %s is in-doubt (kept paused): %s", mvm.vm_id, peer, err or repr(e))
        else:
            if mvm is not None:
                registry.remove(mvm.vm_id)    # discard: never run a VM the source did not release
            m.migration("aborted")
            log.warning("incoming migration from %s aborted: %s", peer, err or repr(e))
        await conn.abort_quietly(str(err or e), err.kind if err else "destination")
        if err is None:
            raise                             # a bug or cancellation: let it propagate
        return None
