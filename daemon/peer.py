"""The peer data plane: the I/O shell around protocol.session for both roles.

Source (migrate_out), the VM still running: Hello -> read the destination's Capabilities -> read the VM
profile (first vCPU's registers, drift registers) -> compute the plan -> PlanProposal -> PlanAccept ->
Preflight. Only then the blackout: pause the VM -> read every vCPU's registers -> check that the VM profile
the plan was computed from is unchanged (ID / imp-ID / cache / FW registers are frozen once a vCPU has run;
anything else changed aborts cleanly, the VM resumes) -> stream in checksummed chunks -> StreamEnd -> wait
for the destination's Commit ("applied and verified") -> release the VM -> Commit.
Any failure before the destination's Commit leaves the VM running here (resumed if it was paused).

Destination (handle_incoming): Hello -> Capabilities -> check the plan (digest echoed in PlanAccept) ->
Preflight (trial apply of the VM-wide registers on a scratch VM) -> receive chunks -> apply (apply.py) and
verify -> adopt the VM paused -> Commit -> run it only when the source's Commit arrives. A failure before
our Commit discards the VM (closed, never run); a broken link after it leaves the VM paused "in-doubt".

Plans: both daemons run the negotiation engine (protocol/negotiate.py). The destination sends its
HostCapabilities (Cap'n Proto); the source builds the VmProfile of its VM (ID / imp-ID / cache / FW register
values and vCPU features, plus the drift registers) and computes the Plan. A refused plan aborts here, with
the plan's reasons in the Abort, before anything moves. Otherwise the PlanProposal carries the VmProfile,
the source's Plan and its digest (negotiate.plan_digest); the destination recomputes the plan from the same
VmProfile and its own capabilities and policy, refuses when it is refused or when the digests differ (naming
the first differing entry), and echoes the digest in PlanAccept. The plan becomes the apply engine's
an ApplyProgram through program.compile_plan; pre-flight and the final apply are judged against the plan's
values (apply.plan_deviations).
"""
from __future__ import annotations

import itertools
import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import trio

from ..protocol import kernelver, kvmabi as abi
from ..protocol import schemas as S
from ..protocol import session as ps
from ..protocol.catalog import catalog
from ..protocol.errors import ProtocolError, RemoteProtocolError
from ..protocol.framing import Limits
from ..protocol.negotiate import negotiate
from ..protocol.policy import Policy, default_policy
from ..protocol.program import compile_plan
from . import failpoints
from .apply import (ApplyError, apply_vm, apply_vm_async, plan_deviations, read_vm, read_vm_async,
                    vm_wide)
from .kvm.backend import Backend, Vcpu
from .kvm.errors import KvmError
from .logs import kv
from .metrics import Metrics
from .vms import ManagedVm, VmRegistry, VmState, VmStateError

log = logging.getLogger("invariantd.peer")

PLAN_FORMAT = "invariantd/plan@1"                       # invariantd.capnp Plan; digest = negotiate.plan_digest
CAPS_FORMAT = "invariantd/host-capabilities@1+capnp"    # invariantd.capnp HostCapabilities
RECEIVE_BYTES = 256 * 1024
TLS_RECORD = 16384                       # TLS's largest record (plaintext bytes)


class PeerError(Exception):
    """A migration over the peer link failed. kind: tls | protocol | aborted | plan | preflight | apply |
    timeout | closed | vm; the message says what happened and, where known, what to do."""

    def __init__(self, kind: str, msg: str, code: str = "") -> None:
        super().__init__(f"{kind}: {msg}")
        self.kind = kind
        self.code = code                 # kind "aborted": the peer's Abort code


CAPS_ONLY = "caps-only"                  # Abort code of a capabilities fetch (rpc plan): not a migration


@dataclass(frozen=True)
class PeerConfig:
    node: str = "invariantd"
    chunk_registers: int = 4096          # per chunk; a vCPU's whole set (~300 registers) in one message
    chunk_bytes: int = 1 << 20           # protocol 2: vCPUs sharing a register list go together up to this size
                                         # (fewer, larger events: the per-chunk cost is paid ~3x for 256 SVE vCPUs)
    checksum: str = "xxh3"               # per chunk; with a peer older than its protocol (CHECKSUM_SINCE): crc32
    limits: Limits = Limits()
    handshake_timeout: float = 10.0
    phase_timeout: float = 30.0          # plan, preflight, each received message while streaming
    apply_timeout: float = 60.0          # destination apply + verify (source waits this long for Commit)
    commit_timeout: float = 30.0
    send_batch_bytes: int = 256 * 1024   # stream bytes per TLS write
    first_batch_bytes: int = 64 * 1024   # the first write: the destination starts reading sooner
    versions: tuple[int, ...] = ps.PROTOCOL_VERSIONS   # peer protocol versions spoken (pin during a rolling upgrade)


@dataclass
class MigrationResult:
    migration_id: str
    vm_id: str
    result: str                          # committed | in-doubt
    events: list = field(default_factory=list)
    digest: bytes = b""


# --- plans: the negotiation engine on both sides ----------------------------------------------------------------
def _feature_names(init) -> tuple[str, ...]:
    names = {v: k for k, v in abi.VCPU_FEATURES.items()}
    return tuple(names.get(f, str(f)) for f in (init.features if init is not None else ()))


def vm_profile(vm_id: str, init, regsets: Mapping[int, Sequence[tuple[int, int]]], backend: Backend,
               policy: Policy) -> S.VmProfile:
    """The negotiation input for a VM held here: VM-wide register values (ID / imp-ID / cache / FW, read on
    vCPU 0), the drift registers (per vCPU: a value that is not a reset value wins, so the plan refuses
    rather than the apply aborting later), the register list, the vCPU features, what the guest saw."""
    first = list(regsets[min(regsets)])
    keep = frozenset(policy.drift)
    cat = catalog()
    values = {r: v for r, v in first if r in keep or r in S.PLANNED_IDS or cat.reg_class(r) in S.PLANNED_CLASSES}
    for rid, d in policy.drift.items():
        resets = getattr(d, "resets", None) or (d.reset,)
        for regs in regsets.values():
            for r, v in regs:
                if r == rid and v not in resets:
                    values[rid] = v
    try:
        midrs = tuple(sorted(set(backend.cpu_midrs())))
        kernel = kernelver.major_minor(backend.kernel_release())
    except Exception:       # a backend that cannot say: the plan then knows less about what the guest saw
        midrs, kernel = (), ""
    return S.VmProfile(name=vm_id, revision=1, features=_feature_names(init), values=tuple(sorted(values.items())),
                       reg_list=tuple(r for r, _ in first), seen_midrs=midrs, source_kernel=kernel)


def profile_view(regsets: Mapping[int, Sequence[tuple[int, int]]], policy: Policy) -> dict[int, list]:
    """The part of a VM's register sets vm_profile reads: the first vCPU's whole set, the drift registers of
    the others (the same profile as from the whole sets)."""
    first = min(regsets)
    drift = frozenset(policy.drift)
    return {i: list(regs) if i == first else [(r, v) for r, v in regs if r in drift]
            for i, regs in regsets.items()}


def profile_regsets(vcpus: Mapping[int, Vcpu], policy: Policy) -> dict[int, list[tuple[int, int]]]:
    """Read what vm_profile needs, no more (the VM may still run): the first vCPU's whole register set and
    the drift registers each other vCPU lists. Equals profile_view(read_vm(vcpus), policy)."""
    first = min(vcpus)
    out = read_vm({first: vcpus[first]})
    drift = frozenset(policy.drift)
    if drift:
        for i, v in sorted(vcpus.items()):
            if i != first:
                ids = [r for r in v.reg_list() if r in drift]
                out[i] = read_vm({i: v}, ids)[i] if ids else []
    else:
        out.update({i: [] for i in vcpus if i != first})
    return out


def profile_changes(before: S.VmProfile, after: S.VmProfile, limit: int = 16) -> list[str]:
    """What differs between the VM profile the plan was computed from (VM running) and the paused VM's:
    ID / imp-ID / cache / FW values (frozen once a vCPU ran, so normally nothing), drift registers, the
    register list, the vCPU features. Empty when the plan still describes the VM."""
    if before == after:
        return []
    cat = catalog()
    out = []
    if before.features != after.features:
        out.append(f"vCPU features {list(before.features)} -> {list(after.features)}")
    if before.reg_list != after.reg_list:
        gone, new = set(before.reg_list) - set(after.reg_list), set(after.reg_list) - set(before.reg_list)
        out.append(f"register list changed ({len(gone)} gone, {len(new)} new"
                   + (f": {', '.join(cat.name(r) for r in sorted(gone | new)[:8])}" if gone | new else "") + ")")
    a, b = dict(before.values), dict(after.values)
    for r in sorted(set(a) | set(b)):
        if a.get(r) != b.get(r):
            fmt = lambda x: "absent" if x is None else f"{x:#x}"         # noqa: E731
            out.append(f"{cat.name(r)}: {fmt(a.get(r))} at plan time, {fmt(b.get(r))} after the pause")
            if len(out) >= limit:
                break
    return out or ["the VM profile differs (seen MIDRs / kernel)"]


def refusal_reasons(plan: S.Plan, limit: int = 40) -> str:
    """The refused entries of a plan, one 'REGISTER[.FIELD]: reason' per entry (field rows first)."""
    rows = [f"{e.register}{'.' + e.field if e.field else ''}: {e.reason}"
            for e in plan.entries if e.verdict is S.Verdict.REFUSE]
    more = f"; ... {len(rows) - limit} more" if len(rows) > limit else ""
    return "; ".join(rows[:limit]) + more


def explain_mismatch(ours: S.Plan, theirs: S.Plan | None) -> str:
    """Why two plans' digests differ, as precisely as the decoded plans allow."""
    if theirs is None:
        return "the source's plan could not be decoded"
    if ours.policy != theirs.policy:
        return f"different policies: source {theirs.policy!r}, destination {ours.policy!r}"
    for k in ("vm_name", "destination", "migratable", "enable_cap239", "big_little", "assumed_cluster"):
        if getattr(ours, k) != getattr(theirs, k):
            return f"{k}: source {getattr(theirs, k)!r}, destination {getattr(ours, k)!r}"
    for a, b in zip(theirs.entries, ours.entries):
        if a != b:
            return (f"first differing entry: source {a.register}{'.' + a.field if a.field else ''} "
                    f"{a.verdict.value} {a.planned:#x} ({a.reason}), destination {b.register}"
                    f"{'.' + b.field if b.field else ''} {b.verdict.value} {b.planned:#x} ({b.reason})")
    if len(ours.entries) != len(theirs.entries):
        return f"source plan has {len(theirs.entries)} entries, destination {len(ours.entries)}"
    return "same entries but different header (notes / guest-visible summary / engine version)"


def stream_deviations(vm: S.VmProfile, regsets: Mapping[int, Sequence[tuple[int, int]]]) -> list[str]:
    """VM-wide registers streamed with other values than the VmProfile the plan was computed from."""
    want = {r: v for r, v in vm.values if vm_wide(r)}
    cat = catalog()
    out = []
    for i, regs in sorted(regsets.items()):
        got = dict(regs)
        for r, v in want.items():
            if got.get(r) != v:
                have = got.get(r)
                out.append(f"vCPU {i} {cat.name(r)}: streamed {'nothing' if have is None else f'{have:#x}'}, "
                           f"the plan's VM profile says {v:#x}")
                if len(out) >= 16:
                    return out
    return out


def _features(vm: S.VmProfile) -> tuple[int, ...] | None:
    try:
        return tuple(abi.VCPU_FEATURES[f] for f in vm.features) or None
    except KeyError as e:
        raise PeerError("plan", f"unknown vCPU feature {e.args[0]!r} in the VM profile") from None


# --- the I/O shell ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """Events encoded back to back (Conn.prepare): the bytes, and each event with its first byte's offset."""
    data: memoryview
    events: list


class Conn:
    def __init__(self, stream: trio.abc.Stream, session: ps.Session, metrics: Metrics | None,
                 on_event: Callable[[str, object], None] | None = None) -> None:
        """on_event(direction, event): told of every event sent ("out") and received ("in"), e.g. for progress."""
        self.stream, self.session, self.metrics = stream, session, metrics
        self.on_event = on_event or (lambda direction, event: None)
        self._written = 0

    async def send(self, event) -> None:
        self.on_event("out", event)
        await self._write(self.session.send(event))

    def prepare(self, events) -> "Prepared":
        """Encode events into one buffer for send_prepared (the session counts them as sent from here on;
        send_failed() if they never go out). The source does this right after reading the paused VM, so that
        the stream phase only writes."""
        parts: list = []
        starts: list[tuple[int, object]] = []
        pos = 0
        for ev in events:
            p = self.session.send_parts(ev)
            starts.append((pos, ev))
            parts.extend(p)
            pos += sum(map(len, p))
        return Prepared(memoryview(b"".join(parts)), starts)

    async def send_prepared(self, prep: "Prepared", batch_bytes: int = 256 * 1024, timeout: float | None = None,
                            first_bytes: int = 0) -> None:
        """Write prepared events as one byte stream in pieces of batch_bytes (the first of first_bytes, when set:
        the receiver starts on it sooner), one TLS write each, straight from the buffer (a frame may straddle two
        writes: the peer reads a byte stream). Pieces are multiples of TLS_RECORD bytes, so every TLS record is
        full: no short record for the receiver to read and decrypt on its own. batch_bytes < TLS_RECORD: each
        event is written alone (tests cut the stream there). on_event("out", ev) is told as ev's first byte is
        about to be written. timeout: seconds each write may take (a stalled peer is noticed per write)."""
        data, evs = prep.data, prep.events
        told = 0

        def tell(upto: int) -> None:
            nonlocal told
            while told < len(evs) and evs[told][0] < upto:
                self.on_event("out", evs[told][1])
                told += 1
        if batch_bytes < TLS_RECORD:
            bounds = [start for start, _ in evs] + [len(data)]
            for i in range(len(evs)):
                tell(bounds[i] + 1)
                await self._write(data[bounds[i]:bounds[i + 1]], timeout)
            return
        pos, limit = 0, min(first_bytes or batch_bytes, batch_bytes)
        while pos < len(data):
            piece = max(TLS_RECORD, limit - limit % TLS_RECORD)
            tell(pos + piece)
            await self._write(data[pos:pos + piece], timeout)
            pos += piece
            limit = batch_bytes

    async def _write(self, data: bytes, timeout: float | None = None) -> None:
        cut = failpoints.byte_cut(self.session.our_role) if failpoints.ACTIVE else None
        if cut is not None:                 # fault injection (failpoints.py): the stream breaks after `cut` bytes
            if self._written + len(data) > cut:
                await self.stream.send_all(data[:max(0, cut - self._written)])
                self._written = cut
                self.session.send_failed()
                raise trio.BrokenResourceError(f"failpoint {self.session.our_role}.bytes: cut after {cut} bytes")
            self._written += len(data)
        try:
            if timeout is None:
                await self.stream.send_all(data)
            else:
                with trio.fail_after(timeout):
                    await self.stream.send_all(data)
        except BaseException:
            self.session.send_failed()
            raise
        if self.metrics:
            self.metrics.stream("sent", len(data))

    async def receive(self):
        got = 0                       # counted once per event, not per TLS record (16 KiB each)
        session, stream = self.session, self.stream
        try:
            while True:
                ev = session.next_event()
                if ev is not ps.NEED_DATA:
                    self.on_event("in", ev)
                    return ev
                while True:               # a frame spans many TLS records: ask for the event once it can be whole
                    data = await stream.receive_some(RECEIVE_BYTES)
                    got += len(data)
                    if session.receive_data(data):
                        break
        finally:
            if self.metrics and got:
                self.metrics.stream("received", got)

    async def expect(self, *types):
        ev = await self.receive()
        if isinstance(ev, ps.Abort):
            raise PeerError("aborted", f"peer aborted ({ev.code or 'no code'}): {ev.reason}", ev.code)
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


def _describe(e: BaseException) -> str:
    """An exception as an operator reads it (not trio's task and scope reprs)."""
    if isinstance(e, trio.Cancelled):
        return "cancelled (by request or daemon shutdown)"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


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


def stream_estimate(vm: S.VmProfile, vcpus: int, version: int) -> int:
    """About the bytes a VM's chunks take on the wire (values, register ids, framing), from its register list:
    what the destination reserves before the stream (Session.reserve). Protocol 2 chunks are assumed to carry
    at least 64 KiB; a smaller estimate only means the last frames are buffered the ordinary way."""
    try:
        values = sum(ps.register_size(r) for r in vm.reg_list)
    except Exception:
        return 0
    ids = 8 * len(vm.reg_list) + 256
    if version < 2:
        return vcpus * (values + ids)
    chunks = -(-vcpus * values // (64 * 1024)) + 1
    return vcpus * (values + 64) + chunks * ids


def _regsets(chunks: Sequence[ps.VcpuChunk]) -> dict[int, list[tuple[int, int]]]:
    """Received chunks -> each vCPU's (id, value) list: values are decoded here, at apply time."""
    out: dict[int, list[tuple[int, int]]] = {}
    for c in chunks:
        for vcpu, regs in c.per_vcpu().items():
            out.setdefault(vcpu, []).extend(regs)
    return out


def _later(make: Callable[[], object]):
    """One event, made when an iteration reaches it."""
    yield make()


def _chunks(vm_id: str, regsets, n: int, checksum: str, version: int = 1, chunk_bytes: int = 128 * 1024):
    """The chunks of a VM's register sets. Protocol 1: one vCPU per chunk, at most n registers each.
    Protocol 2: consecutive vCPUs with the same register list (every vCPU of a VM, normally) share chunks of
    about chunk_bytes; a vCPU with more than n registers is split into single-vCPU chunks as in protocol 1."""
    items = sorted(regsets.items())
    if version < 2:
        for vcpu, regs in items:
            for k in range(max(1, math.ceil(len(regs) / n))):
                yield ps.VcpuChunk.build(vm_id, vcpu, k, regs[k * n:(k + 1) * n], checksum)
        return
    i = 0
    while i < len(items):
        vcpu, regs = items[i]
        if len(regs) > n:
            for k in range(math.ceil(len(regs) / n)):
                yield ps.VcpuChunk.build(vm_id, vcpu, k, regs[k * n:(k + 1) * n], checksum)
            i += 1
            continue
        ids = [r for r, _ in regs]
        per = 8 * len(ids) + sum(ps.register_size(r) for r in ids)
        group = [[v for _, v in regs]]
        j = i + 1
        while j < len(items) and items[j][0] == vcpu + (j - i) and (j - i + 1) * per <= max(chunk_bytes, per):
            nregs = items[j][1]
            if len(nregs) != len(ids) or any(a != r for (a, _), r in zip(nregs, ids)):
                break
            group.append([v for _, v in nregs])
            j += 1
        yield ps.VcpuChunk.build_multi(vm_id, vcpu, 0, ids, group, checksum)
        i = j


def host_capabilities(caps_doc: dict, backend: Backend, policy: Policy) -> S.HostCapabilities:
    """This host as the negotiation sees it. arm64: the capability document (probe.py). Other architectures
    (the generic plan, negotiate.negotiate_generic): the document's arch / kernel / caps plus the register
    list of a fresh vCPU on a scratch VM (x86: KVM-listed registers + the MSRs GET_ONE_REG accepts), which
    the plan checks the source's list against; no values (nothing is negotiated per value there)."""
    if caps_doc.get("arch") == "aarch64":
        return S.host_from_doc(caps_doc, frozenset(policy.drift))
    reg_list: tuple[int, ...] = ()
    if caps_doc.get("one_reg"):
        vm = backend.create_vm(0)
        try:
            reg_list = tuple(vm.create_vcpu(0).reg_list())
        finally:
            vm.close()
    caps = tuple(sorted((str(k), int(v)) for k, v in (caps_doc.get("caps") or {}).items()))
    return S.HostCapabilities(kernel_release=str(caps_doc.get("kernel_release", "")),
                              kernel_version=str(caps_doc.get("kernel_version", "")),
                              arch=str(caps_doc.get("arch", "")), caps=caps, reg_list=reg_list, values=(),
                              writable_masks=None, profile=str(caps_doc.get("profile") or ""))


def apply_report(events) -> tuple[list, list]:
    """(events metrics count, read-back adjustments): "readback-adjusted" events are no SET_ONE_REG failure;
    they are logged and returned with the migration result instead."""
    counted = [e for e in events if e.action != "readback-adjusted"]
    adjusted = [e for e in events if e.action == "readback-adjusted"]
    return counted, adjusted


def _by_register(events) -> dict[str, list]:
    out: dict[str, list] = {}
    for e in events:
        out.setdefault(e.register, []).append(e)
    return out


Planner = Callable[[S.VmProfile, S.HostCapabilities, Policy], S.Plan]
PlanChecker = Callable[[S.Plan, S.VmProfile], None]


def answer_inquiry(registry: VmRegistry, q: ps.Inquiry) -> ps.Answer:
    """What this daemon decided for migration q.migration_id (its journal) and holds of q.vm_id now."""
    rec = registry.journal.migration(q.migration_id)
    if rec is not None and rec.vm != q.vm_id:
        rec = None                           # a migration of another VM: no record of this one
    held = registry.vms.get(q.vm_id)
    return ps.Answer(q.migration_id, q.vm_id, rec.outcome if rec else "", rec.phase if rec else "",
                     held.state.value if held is not None else "")


async def inquire(stream: trio.abc.Stream, migration_id: str, vm_id: str, *,
                  cfg: PeerConfig = PeerConfig()) -> ps.Answer:
    """Ask a peer (protocol 5) what it decided for a migration and what it holds of its VM."""
    conn = Conn(stream, ps.Session(ps.SOURCE, cfg.limits, cfg.versions), None)
    try:
        with trio.fail_after(cfg.handshake_timeout):
            await conn.send(ps.Hello(cfg.versions, ps.SOURCE, cfg.node))
            await conn.expect(ps.Hello)
            await conn.expect(ps.Capabilities)
            if (conn.session.version or 1) < ps.INQUIRY_SINCE:
                await conn.abort_quietly("inquiry needs protocol 5", CAPS_ONLY)
                raise PeerError("protocol", f"the peer speaks protocol {conn.session.version}: it cannot be asked "
                                            f"about a migration (upgrade it to protocol {ps.INQUIRY_SINCE})")
            await conn.send(ps.Inquiry(migration_id, vm_id))
            return await conn.expect(ps.Answer)
    except BaseException as e:
        err = _wrap(e)
        if err is not None and err is not e:
            raise err from e
        raise


async def fetch_capabilities(stream: trio.abc.Stream, *, cfg: PeerConfig = PeerConfig()) -> ps.Capabilities:
    """A peer's capability document without migrating: Hello, its Hello and Capabilities, then an Abort coded
    caps-only (the peer logs no failed migration for it)."""
    conn = Conn(stream, ps.Session(ps.SOURCE, cfg.limits, cfg.versions), None)
    try:
        with trio.fail_after(cfg.handshake_timeout):
            await conn.send(ps.Hello(cfg.versions, ps.SOURCE, cfg.node))
            await conn.expect(ps.Hello)
            caps = await conn.expect(ps.Capabilities)
        await conn.abort_quietly("capabilities only (plan)", CAPS_ONLY)
        return caps
    except BaseException as e:
        err = _wrap(e)
        if err is not None and err is not e:
            raise err from e
        raise


def decode_caps(ev: ps.Capabilities) -> S.HostCapabilities:
    if ev.format != CAPS_FORMAT:
        raise PeerError("protocol", f"destination capabilities in format {ev.format!r}; this daemon reads "
                                    f"{CAPS_FORMAT!r} (upgrade the older daemon)")
    try:
        return S.host_from_bytes(ev.doc)
    except S.SchemaError as e:
        raise PeerError("protocol", f"destination capabilities: {e}") from None


async def migrate_out(stream: trio.abc.Stream, registry: VmRegistry, vm_id: str, *, cfg: PeerConfig = PeerConfig(),
                      metrics: Metrics | None = None, planner: Planner | None = None,
                      migration_id: str | None = None, policy: Policy | None = None,
                      on_plan: Callable[[S.Plan], None] | None = None,
                      on_event: Callable[[str, object], None] | None = None, peer: str = "") -> MigrationResult:
    """Source side over an established (TLS) stream. Raises PeerError; the VM is then running here again.
    peer: the destination's name (the journal's; the operator's resolve and the resolver ask it by that name).

    policy: the negotiation policy (default: the shipped default; the destination must use the same one,
    the plan digest covers it). planner: the negotiation engine (negotiate) unless a test injects another.
    on_plan: called with the plan before it is proposed (refused plans included).
    on_event: called with ("out" | "in", event) for every protocol event (progress reporting)."""
    mvm = registry.get(vm_id)
    mid = migration_id or uuid.uuid4().hex
    conn = Conn(stream, ps.Session(ps.SOURCE, cfg.limits, cfg.versions), metrics, on_event)
    m = metrics or Metrics()
    pol = policy or default_policy()
    if not mvm.runnable:
        raise VmStateError(f"VM {vm_id}: cannot migrate out while {mvm.state.value} (only a running VM can)")
    journal = registry.journal
    paused = released = begun = False
    try:
        # Handshake, plan agreement and the destination's pre-flight run while the VM still runs: the plan
        # depends on ID / imp-ID / cache / FW values (frozen once a vCPU has run) and the drift registers;
        # after the pause they are read again and must be unchanged (else abort, the VM keeps running).
        with m.phase("handshake"), trio.fail_after(cfg.handshake_timeout):
            await conn.send(ps.Hello(cfg.versions, ps.SOURCE, cfg.node))
            await conn.expect(ps.Hello)
            caps_ev = await conn.expect(ps.Capabilities)
        dest = decode_caps(caps_ev)
        version = conn.session.version or 1
        checksum = cfg.checksum if ps.CHECKSUM_SINCE[cfg.checksum] <= version else "crc32"
        if checksum != cfg.checksum:
            log.info("checksum downgraded %s: the peer speaks protocol %d, which has no %s checksum: using crc32",
                     kv(migration=mid, vm=vm_id, peer=peer), version, cfg.checksum)
        with m.phase("plan"), trio.fail_after(cfg.phase_timeout):
            try:
                pregs = profile_regsets(mvm.vcpus, pol)
            except KvmError as e:
                raise PeerError("vm", f"cannot read the source VM: {e}") from None
            vm = vm_profile(vm_id, mvm.init, pregs, registry.backend, pol)
            plan = (planner or negotiate)(vm, dest, pol)
            m.record_verdicts(e.verdict.value for e in plan.entries if not e.field)
            if on_plan is not None:
                on_plan(plan)
            if not plan.migratable:
                raise PeerError("plan", f"plan refused for {dest.name}: {refusal_reasons(plan)}")
            prop = ps.PlanProposal(mid, vm_id, len(mvm.vcpus), PLAN_FORMAT, S.plan_to_bytes(plan), plan.digest,
                                   S.vm_to_bytes(vm))
            journal.begin(mid, vm_id, "source", peer, plan.digest)
            begun = True
            await failpoints.hit("source.proposed")
            await conn.send(prop)
            await conn.expect(ps.PlanAccept)
        with m.phase("preflight"), trio.fail_after(cfg.apply_timeout):
            pf = await conn.expect(ps.Preflight)
        if not pf.ok:
            raise PeerError("preflight", f"destination refused the plan in pre-flight: {pf.detail}")
        # --- blackout starts: the VM is runnable nowhere until the destination commits or we resume it
        with m.phase("read"), trio.fail_after(cfg.phase_timeout):
            journal.step(mid, "paused")
            mvm.migration, mvm.peer = mid, peer
            mvm.pause()
            paused = True
            await failpoints.hit("source.paused")
            try:
                regsets = await read_vm_async(mvm.vcpus, registry.backend)    # threads on real KVM
            except KvmError as e:
                raise PeerError("vm", f"cannot read the paused source VM: {e}") from None
            changed = profile_changes(vm, vm_profile(vm_id, mvm.init, profile_view(regsets, pol),
                                                     registry.backend, pol))
            if changed:
                raise PeerError("vm", "the VM changed between plan and pause (the plan no longer describes it; "
                                      "migrate again): " + "; ".join(changed))
            chunks = _chunks(vm_id, regsets, cfg.chunk_registers, checksum, version, cfg.chunk_bytes)
            # the chunks, then their StreamEnd (made once they all went through the session): one byte stream
            stream_bytes = conn.prepare(itertools.chain(chunks, _later(conn.session.stream_end)))
            end = stream_bytes.events[-1][1]
            del regsets, chunks
        with m.phase("stream"):
            await conn.send_prepared(stream_bytes, max(1, cfg.send_batch_bytes), cfg.phase_timeout,
                                     cfg.first_batch_bytes)
            del stream_bytes
            await failpoints.hit("source.streamed")
        with m.phase("apply"), trio.fail_after(cfg.apply_timeout):
            await conn.expect(ps.Commit)
        with m.phase("commit"):
            journal.step(mid, "released")   # written before our Commit can leave: an Inquiry never hears less
            mvm.release()              # never runnable here again: the destination may now run it
            released = True
            try:
                await failpoints.hit("source.released")
                with trio.fail_after(cfg.commit_timeout):
                    await conn.send(ps.Commit(mid, end.digest))
                    await failpoints.hit("source.committed")
                    if (conn.session.version or 1) >= ps.ACKED_COMMIT_SINCE:
                        await conn.expect(ps.Commit)     # the destination runs it: only now is it committed
            except BaseException as e:
                journal.decide(mid, "in-doubt", f"released; no acknowledgement of our Commit: {_describe(e)}")
                m.migration("in-doubt")
                log.error("migration in doubt %s: released, but the destination did not acknowledge our Commit "
                          "(%s): it runs the VM, or keeps it paused in-doubt (resolved by asking it)",
                          kv(migration=mid, vm=vm_id, peer=peer), _wrap(e) or _describe(e))
                raise PeerError("in-doubt", f"VM {vm_id} released; no acknowledgement of our Commit: the destination "
                                            f"runs it or holds it paused in-doubt: {_wrap(e) or _describe(e)}") from e
        journal.step(mid, "acked")
        journal.decide(mid, "committed")
        if (conn.session.version or 1) >= ps.ACKED_COMMIT_SINCE:
            registry.free_released(vm_id, f"the destination {peer or ''} acknowledged: it runs the VM")
        m.migration("committed")
        log.info("migration committed %s: the destination runs the VM", kv(migration=mid, vm=vm_id, peer=peer))
        return MigrationResult(mid, vm_id, "committed", [], end.digest)
    except BaseException as e:
        if released:
            raise
        err = _wrap(e)
        if begun:                      # before the resume: an Inquiry from an in-doubt destination hears "aborted"
            journal.decide(mid, "aborted", str(err) if err else _describe(e))
        if paused:
            mvm.resume()               # the VM never left: keep running here
        await conn.abort_quietly(str(err) if err else _describe(e), err.kind if err else "source")
        m.migration("aborted")
        unreachable = isinstance(err, PeerError) and err.kind in ("closed", "timeout", "tls")
        log.log(logging.ERROR if unreachable else logging.WARNING, "migration aborted %s: VM %s here%s: %s",
                kv(migration=mid, vm=vm_id, peer=peer), "resumed" if paused else "kept running (never paused)",
                " (the peer stopped answering)" if unreachable else "", err or _describe(e))
        if err is not None and err is not e:
            raise err from e
        raise


async def handle_incoming(stream: trio.abc.Stream, peer: str, *, backend: Backend, registry: VmRegistry,
                          caps_doc: dict, cfg: PeerConfig = PeerConfig(), metrics: Metrics | None = None,
                          plan_checker: PlanChecker | None = None,
                          policy: Policy | None = None,
                          preplan_slots: trio.Semaphore | None = None) -> MigrationResult | None:
    """Destination side of one connection. Returns the result, or None when the migration did not complete
    (the reason is logged and was sent to the source).

    caps_doc: this host's capability document (daemon/probe.py); sent as HostCapabilities and used to
    recompute the plan. policy: the negotiation policy (default: the shipped one; must be the source's).
    plan_checker(plan, vm_profile): an extra veto after the plan was agreed (raise ValueError to refuse).
    preplan_slots: connections that may be before their plan at once (each may buffer a pre-plan frame, up to
    Limits.max_preplan_frame_bytes); the others wait, their bytes in the kernel, up to the handshake timeout."""
    conn = Conn(stream, ps.Session(ps.DESTINATION, cfg.limits, cfg.versions), metrics)
    m = metrics or Metrics()
    pol = policy or default_policy()
    journal = registry.journal
    result = None
    mvm: ManagedVm | None = None
    committed = begun = False
    slot = [None]

    def release_slot() -> None:
        if slot[0] is not None:
            slot[0].release()
            slot[0] = None
    try:
        if preplan_slots is not None:
            with trio.fail_after(cfg.handshake_timeout):
                await preplan_slots.acquire()
            slot[0] = preplan_slots
        try:
            host = await trio.to_thread.run_sync(host_capabilities, caps_doc, backend, pol)
        except S.SchemaError as e:
            raise PeerError("plan", f"this host's capability document cannot be negotiated: {e}") from None
        except KvmError as e:
            raise PeerError("plan", f"cannot list this host's registers: {e}") from None
        with m.phase("handshake"), trio.fail_after(cfg.handshake_timeout):
            await conn.expect(ps.Hello)
            await conn.send(ps.Hello(cfg.versions, ps.DESTINATION, cfg.node))
            await conn.send(ps.Capabilities(CAPS_FORMAT, S.host_to_bytes(host)))
        with m.phase("plan"), trio.fail_after(cfg.phase_timeout):
            prop = await conn.expect(ps.PlanProposal, ps.Inquiry)
            if isinstance(prop, ps.Inquiry):
                ans = answer_inquiry(registry, prop)
                release_slot()
                await conn.send(ans)
                log.info("inquiry answered %s: %s at %s, VM %s here", kv(migration=ans.migration_id, vm=ans.vm_id,
                                                                          peer=peer),
                         ans.outcome or "no record", ans.phase or "-", ans.vm_state or "not held")
                return None
            try:
                held = registry.vms.get(prop.vm_id)
                if held is not None and held.state is not VmState.RELEASED:
                    raise ValueError(f"a VM named {prop.vm_id!r} is already held here ({held.state.value}); rename or "
                                     f"remove one of them")
                if prop.format != PLAN_FORMAT:
                    raise ValueError(f"plan format {prop.format!r} is not understood here (want {PLAN_FORMAT})")
                try:
                    vm = S.vm_from_bytes(prop.vm_profile)
                except S.SchemaError as e:
                    raise ValueError(f"VM profile: {e}") from None
                plan = negotiate(vm, host, pol)
                m.record_verdicts(e.verdict.value for e in plan.entries if not e.field)
                if not plan.migratable:
                    raise ValueError(f"refused here: {refusal_reasons(plan)}")
                if plan.digest != prop.digest:
                    try:
                        theirs = S.plan_from_bytes(prop.plan)
                    except S.SchemaError:
                        theirs = None
                    raise ValueError(f"plan digest mismatch (source {prop.digest.hex()[:16]}, destination "
                                     f"{plan.digest.hex()[:16]}): {explain_mismatch(plan, theirs)}")
                feats = _features(vm)
                apply_program = compile_plan(plan, vm)
                if plan_checker is not None:
                    plan_checker(plan, vm)
            except ValueError as e:
                raise PeerError("plan", f"plan refused: {e}") from None
            journal.begin(prop.migration_id, prop.vm_id, "destination", peer, plan.digest)
            begun = True
            release_slot()
            await failpoints.hit("destination.accepted")
            await conn.send(ps.PlanAccept(prop.migration_id, plan.digest))
        with m.phase("preflight"), trio.fail_after(cfg.apply_timeout):
            # Trial apply of the planned VM-wide registers (+ drift registers) on a scratch VM: the source's
            # values through the same retry path the real apply takes, ending where the plan says.
            trial_regs = {0: list(vm.values)}
            try:
                trial = await trio.to_thread.run_sync(
                    lambda: apply_vm(backend, trial_regs, apply_program, features=feats))
                trial.close()               # trial events go to the source in Preflight, not to metrics
                bad = [str(x) for x in trial.mismatches] + plan_deviations(plan, trial.written[0],
                                                                          trial.dropped[0])
                ok, detail = not bad, "; ".join(bad) or "ok"
                evs = tuple(f"{e.register} {e.errno} {e.action}" for e in trial.events)
            except ApplyError as e:
                ok, detail, evs = False, str(e), tuple(f"{x.register} {x.errno} {x.action}" for x in e.events)
            if ok:                          # memory for the stream, taken while the source's VM still runs
                conn.session.reserve(stream_estimate(vm, prop.vcpus, conn.session.version or 1))
            await conn.send(ps.Preflight(ok, detail, evs))
            if not ok:
                ev = await conn.receive()          # the source aborts; anything else is its problem
                raise PeerError("preflight", f"pre-flight failed: {detail}" + (
                    "" if isinstance(ev, ps.Abort) else f" (source sent {type(ev).__name__})"))
        received: list[ps.VcpuChunk] = []
        with m.phase("stream"):
            while True:
                with trio.fail_after(cfg.phase_timeout):
                    ev = await conn.expect(ps.VcpuChunk, ps.StreamEnd)
                if isinstance(ev, ps.StreamEnd):
                    break
                received.append(ev)         # checked (checksum, order, digest); decoded to values at apply time
        await failpoints.hit("destination.streamed")
        with m.phase("apply"), trio.fail_after(cfg.apply_timeout):
            regsets = await trio.to_thread.run_sync(_regsets, received)
            bad = stream_deviations(vm, regsets)
            if bad:
                raise PeerError("apply", "the streamed registers are not the VM the plan was computed for: "
                                + "; ".join(bad))
            res = await apply_vm_async(backend, regsets, apply_program, features=feats)   # threads on real KVM
            counted, adjusted = apply_report(res.events)
            m.record_apply_events(counted)
            for reg, evs in _by_register(adjusted).items():     # one line per register, not per vCPU
                log.warning("read back differently %s: %s on %d vCPU(s) (KVM adjusts it); vCPU %s: %s",
                            kv(migration=prop.migration_id, vm=prop.vm_id, peer=peer), reg, len(evs), evs[0].vcpu,
                            evs[0].detail)
            bad = [str(x) for x in res.mismatches[:8]]
            for i in sorted(res.written):
                bad += plan_deviations(plan, res.written[i], res.dropped[i], vcpu=i)
                if len(bad) >= 8:
                    break
            if bad:
                res.close()
                raise PeerError("apply", "applied state differs from the plan / read-back: " + "; ".join(bad[:8]))
            journal.step(prop.migration_id, "applied")     # before our Commit can leave (journal.py)
            mvm = registry.adopt(prop.vm_id, res.vm, res.vcpus, None, VmState.INCOMING, migration=prop.migration_id,
                                 peer=peer)
        with m.phase("commit"):
            digest = conn.session.stream_digest
            committed = True                 # from here the source may have our Commit: never discard unasked
            await failpoints.hit("destination.applied")
            await conn.send(ps.Commit(prop.migration_id, digest))
            await failpoints.hit("destination.committed")
            with trio.fail_after(cfg.commit_timeout):
                await conn.expect(ps.Commit)
            journal.step(prop.migration_id, "running")
            journal.decide(prop.migration_id, "committed")
            mvm.resume()                     # the source released it: this host runs the VM now
            await failpoints.hit("destination.running")
            if (conn.session.version or 1) >= ps.ACKED_COMMIT_SINCE:
                try:
                    with trio.fail_after(cfg.commit_timeout):
                        await conn.send(ps.Commit(prop.migration_id, digest))     # "received: it runs here"
                except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    log.warning("acknowledgement lost %s: the VM runs here, the source reports it in doubt until "
                                "it asks (%s)", kv(migration=prop.migration_id, vm=prop.vm_id, peer=peer),
                                _describe(e))
        m.migration("committed")
        log.info("migration committed %s: the VM runs here", kv(migration=prop.migration_id, vm=prop.vm_id,
                                                                  peer=peer))
        result = MigrationResult(prop.migration_id, prop.vm_id, "committed", res.events, digest)
        return result
    except BaseException as e:
        err = _wrap(e)
        if isinstance(err, PeerError) and err.kind == "aborted" and err.code == CAPS_ONLY and mvm is None:
            log.info("capabilities sent %s (caps-only fetch, no migration)", kv(peer=peer))
            return None
        source_kept = (isinstance(err, PeerError) and err.kind == "aborted"
                       and conn.session.aborted_by == ps.SOURCE)   # its Abort: it never released the VM
        if mvm is not None and committed and mvm.state is VmState.RUNNING:
            log.warning("acknowledgement lost %s: the VM runs here: %s",
                        kv(migration=prop.migration_id, vm=mvm.vm_id, peer=peer), err or _describe(e))
            m.migration("committed")
            if err is None:
                raise
            return MigrationResult(prop.migration_id, prop.vm_id, "committed", [], conn.session.stream_digest)
        if mvm is not None and committed and not source_kept:
            journal.decide(prop.migration_id, "in-doubt", str(err) if err else _describe(e))
            mvm.in_doubt()                   # the source may have released it: keep it paused, never discard
            m.migration("in-doubt")
            log.error("migration in doubt %s: kept paused until the source answers: %s",
                      kv(migration=prop.migration_id, vm=mvm.vm_id, peer=peer), err or _describe(e))
        else:
            if begun:
                journal.decide(prop.migration_id, "aborted", str(err) if err else _describe(e))
            if mvm is not None:
                registry.remove(mvm.vm_id, "discarded: the source aborted and kept the VM" if source_kept else
                                "discarded: the migration aborted before our Commit")
            m.migration("aborted")
            log.warning("incoming migration aborted %s: %s", kv(migration=prop.migration_id if begun else "",
                                                                 vm=prop.vm_id if begun else "", peer=peer),
                        err or _describe(e))
        await conn.abort_quietly(str(err) if err else _describe(e), err.kind if err else "destination")
        if err is None:
            raise                             # a bug or cancellation: let it propagate
        return None
    finally:
        release_slot()
