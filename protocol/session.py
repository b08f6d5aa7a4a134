"""The peer session, sans-IO (h11 style): bytes in -> events out, events in -> bytes out. No networking here.

    s = Session(SOURCE)
    wire = s.send(Hello(versions=(1,), role="source"))      # bytes for the transport
    s.receive_data(data)                                     # b"" = the peer closed
    ev = s.next_event()                                      # an event, NEED_DATA, or ConnectionClosed()

Conversation (one shared state; S = source, D = destination):

    START -S:Hello-> GREETING -D:Hello-> GREETED -D:Capabilities-> CAPS_KNOWN -S:PlanProposal-> PROPOSED
    -D:PlanAccept-> AGREED -D:Preflight-> READY -S:VcpuChunk-> STREAMING (-S:VcpuChunk-> STREAMING)
    -S:StreamEnd-> STREAMED -D:Commit-> COMMITTING -S:Commit-> DONE                 (protocol 1-3)
                                                   -S:Commit-> RELEASED -D:Commit-> DONE   (protocol 4)
    CAPS_KNOWN -S:Inquiry-> INQUIRED -D:Answer-> DONE                                    (protocol 5)
    any state but RELEASED/DONE/ABORTED -(either):Abort-> ABORTED

The D Commit means "applied and verified, paused"; the S Commit means "source released its VM: run it"; from
protocol 4 a third, the destination's again, means "received: the VM runs here" (a source says committed only
after it).
The session checks what it can without I/O: roles, order, a common version, the plan digest (the
negotiation engine's, which the destination recomputes from the proposal's VM profile) echoed by PlanAccept, per-chunk checksums, chunk numbering per vCPU, the whole-set digest
in StreamEnd and both Commits. Any violation by the peer raises RemoteProtocolError naming it; by us,
LocalProtocolError. Either makes ERROR sticky. After ABORTED, messages that crossed the Abort on the wire
are still returned (so the caller can log them) but change nothing.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence, Union

import xxhash

from . import regid
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .framing import FrameDecoder, Limits

# 1: one vCPU per chunk; StreamEnd digest = sha256 over every chunk's checksummed bytes.
# 2: chunks may carry several vCPUs sharing one register list (VcpuChunk.count); StreamEnd digest = a sha256
#    chain over the chunks' headers and checksums (see _chain_entry).
# 3: as 2, and chunks may carry an XXH3-64 checksum ("xxh3": ~10x cheaper than zlib's crc32 on both ends, with
#    SIMD on x86_64 and arm64), refused in a protocol 1/2 session.
# 4: as 3, and the destination acknowledges the source's Commit with a Commit of its own (RELEASED -> DONE): a
#    source never reports committed on a Commit that may not have arrived.
# 5: as 4, and a connection may ask instead of migrate: after Capabilities the connecting side sends an Inquiry
#    (migration id, VM) and the listener answers what its journal decided for that migration and what it holds
#    of the VM (Answer), then the session is DONE: how two daemons resolve an in-doubt VM by themselves.
# All five are spoken; the highest common wins.
PROTOCOL_VERSIONS = (1, 2, 3, 4, 5)
STREAM_DIGEST_TAG_V2 = b"invariantd/stream-digest@2\n"
SOURCE, DESTINATION = "source", "destination"
CHECKSUMS = ("crc32", "sha256", "xxh3")        # wire enum order (peer.capnp ChecksumKind)
CHECKSUM_SINCE = {"crc32": 1, "sha256": 1, "xxh3": 3}  # the protocol version that may carry each


class _Sentinel(type):
    def __repr__(cls) -> str:
        return cls.__name__


def _sentinel(name: str) -> type:
    return _Sentinel(name, (), {})


NEED_DATA = _sentinel("NEED_DATA")
START, GREETING, GREETED, CAPS_KNOWN, PROPOSED, AGREED, READY, STREAMING, STREAMED, COMMITTING, RELEASED, DONE, \
    ABORTED, ERROR, INQUIRED = (_sentinel(n) for n in ("START", "GREETING", "GREETED", "CAPS_KNOWN", "PROPOSED",
                                                       "AGREED", "READY", "STREAMING", "STREAMED", "COMMITTING",
                                                       "RELEASED", "DONE", "ABORTED", "ERROR", "INQUIRED"))


def _need(cond: bool, msg: str, what: str = "invalid-message") -> None:
    if not cond:
        raise LocalProtocolError(msg, what)


def _text(v: str, name: str, limit: int = 4096) -> None:
    _need(isinstance(v, str) and len(v) <= limit, f"{name} must be text of at most {limit} characters")


def _u32(v: int, name: str) -> None:
    _need(isinstance(v, int) and 0 <= v < 1 << 32, f"{name} {v!r} is not a u32")


# --- events ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    versions: tuple[int, ...]
    role: str
    node: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "versions", tuple(self.versions))
        _need(0 < len(self.versions) <= 64 and all(isinstance(v, int) and 0 < v < 1 << 16 for v in self.versions),
              f"Hello.versions {self.versions!r} must list 1..64 versions in 1..65535")
        _need(self.role in (SOURCE, DESTINATION), f"Hello.role {self.role!r} is neither source nor destination")
        _text(self.node, "Hello.node", 256)


@dataclass(frozen=True, slots=True)
class Capabilities:
    format: str
    doc: bytes

    def __post_init__(self) -> None:
        _text(self.format, "Capabilities.format", 256)
        _need(isinstance(self.doc, bytes), "Capabilities.doc must be bytes")


def _sha256(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


@dataclass(frozen=True, slots=True)
class PlanProposal:
    migration_id: str
    vm_id: str
    vcpus: int
    format: str
    plan: bytes
    digest: bytes = b""          # the plan digest its format defines; sha256 of `plan` when left empty
    vm_profile: bytes = b""      # the negotiation input the destination recomputes the plan from

    def __post_init__(self) -> None:
        _text(self.migration_id, "PlanProposal.migration_id", 256)
        _text(self.vm_id, "PlanProposal.vm_id", 256)
        _text(self.format, "PlanProposal.format", 256)
        _need(isinstance(self.vcpus, int) and 1 <= self.vcpus <= 4096, f"PlanProposal.vcpus {self.vcpus!r} "
                                                                       f"outside 1..4096")
        _need(isinstance(self.plan, bytes), "PlanProposal.plan must be bytes")
        _need(isinstance(self.vm_profile, bytes), "PlanProposal.vm_profile must be bytes")
        if not self.digest:
            object.__setattr__(self, "digest", _sha256(self.plan))
        _need(isinstance(self.digest, bytes) and len(self.digest) == 32, "PlanProposal.digest must be 32 bytes",
              "bad-digest")


@dataclass(frozen=True, slots=True)
class PlanAccept:
    migration_id: str
    digest: bytes

    def __post_init__(self) -> None:
        _text(self.migration_id, "PlanAccept.migration_id", 256)
        _need(isinstance(self.digest, bytes) and len(self.digest) == 32, "PlanAccept.digest must be 32 bytes")


@dataclass(frozen=True, slots=True)
class Preflight:
    ok: bool
    detail: str = ""
    events: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", tuple(self.events))
        _need(isinstance(self.ok, bool), "Preflight.ok must be a bool")
        _text(self.detail, "Preflight.detail", 65536)
        _need(len(self.events) <= 4096, "Preflight.events: more than 4096 entries")
        for e in self.events:
            _text(e, "Preflight.events[]", 4096)


def chunk_bytes(vcpu: int, chunk: int, reg_ids: Sequence[int], values: bytes, count: int = 0) -> bytes:
    """The bytes a chunk's checksum covers: u32 vcpu, u32 chunk, [u32 count when count > 0: protocol 2],
    u64 register ids, values (little-endian)."""
    head = struct.pack("<III", vcpu, chunk, count) if count else struct.pack("<II", vcpu, chunk)
    return head + struct.pack(f"<{len(reg_ids)}Q", *reg_ids) + values


def _checksum(kind: str, parts: Sequence[bytes]) -> bytes:
    """Checksum of the concatenation of `parts`, computed part by part (no joined copy)."""
    if kind == "crc32":
        crc = 0
        for p in parts:
            crc = zlib.crc32(p, crc)
        return struct.pack("<I", crc)
    h = xxhash.xxh3_64() if kind == "xxh3" else hashlib.sha256()      # xxh3: 8 bytes, canonical (big-endian)
    for p in parts:
        h.update(p)
    return h.digest()


_SIZE_FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}


@dataclass(frozen=True, slots=True)
class _Layout:
    """What a register-id list implies, computed once per distinct list (every vCPU of a VM repeats it)."""
    ids: tuple[int, ...]
    ids_le: bytes                 # the ids as packed u64 LE (the wire form and the checksum input)
    total: int                    # value bytes the ids need
    fmt: str                      # struct format of the values ('Q' ... or 'Ns' for registers wider than 8)
    wide: tuple[int, ...]         # positions of the registers wider than 8 bytes
    sizes: tuple[int, ...]


@lru_cache(maxsize=64)          # bounded: a hostile peer's distinct id lists cannot grow it
def _layout_le(ids_le: bytes) -> _Layout:
    if len(ids_le) % 8:
        raise LocalProtocolError(f"register id list of {len(ids_le)} bytes is not a list of u64", "bad-chunk")
    ids = struct.unpack(f"<{len(ids_le) // 8}Q", ids_le)
    sizes, fmt, wide = [], ["<"], []
    for i, r in enumerate(ids):
        size_code = (r & regid.KVM_REG_SIZE_MASK) >> regid.KVM_REG_SIZE_SHIFT
        _need(size_code <= regid.SIZE_U2048, f"register {r:#018x}: size code {size_code} above U2048",
              "bad-register")
        n = regid.size_bytes(r)
        sizes.append(n)
        if n in _SIZE_FMT:
            fmt.append(_SIZE_FMT[n])
        else:
            fmt.append(f"{n}s")
            wide.append(i)
    return _Layout(ids, ids_le, sum(sizes), "".join(fmt), tuple(wide), tuple(sizes))


def register_size(reg_id: int) -> int:
    """Value bytes of a register on the wire (KVM_REG_SIZE)."""
    return regid.size_bytes(reg_id)


@lru_cache(maxsize=64)
def _layout_ids(ids: tuple[int, ...]) -> _Layout:
    for r in ids:
        _need(isinstance(r, int) and 0 <= r < 1 << 64, f"register id {r!r} is not a u64")
    return _layout_le(struct.pack(f"<{len(ids)}Q", *ids))


@dataclass(frozen=True, slots=True)
class VcpuChunk:
    """Registers of one vCPU, or (protocol 2, count > 0) of `count` consecutive vCPUs vcpu..vcpu+count-1 that
    share one register list: values then hold each vCPU's values in turn. On the wire the ids travel packed
    (regIdsLe); reg_ids is their tuple. Validation per distinct id list is cached (_layout_*): a chunk costs
    a checksum and a lookup. Values are decoded to integers only when asked (registers / per_vcpu)."""
    vm_id: str
    vcpu: int
    chunk: int
    reg_ids: tuple[int, ...]
    values: bytes                 # received chunks: a read-only memoryview of the frame (bytes-like, no copy)
    checksum_kind: str = "crc32"
    checksum: bytes = b""         # computed when left empty
    ids_le: bytes = field(default=b"", repr=False, compare=False)
    count: int = 0                # 0: one vCPU (protocol 1 form); n >= 1: n vCPUs (protocol 2)
    wire: bytes = field(default=b"", repr=False, compare=False)    # the encoded frame, once encode() ran

    def __post_init__(self) -> None:
        # the stream's hot path (once per chunk, both ends): messages are formatted only when a check fails
        vm_id, vcpu, chunk, count, values = self.vm_id, self.vcpu, self.chunk, self.count, self.values
        if not (type(vm_id) is str and len(vm_id) <= 256):
            _text(vm_id, "VcpuChunk.vm_id", 256)
        if not (type(vcpu) is int and type(chunk) is int and type(count) is int
                and 0 <= vcpu < 1 << 32 and 0 <= chunk < 1 << 32 and 0 <= count < 1 << 32):
            _u32(vcpu, "VcpuChunk.vcpu")
            _u32(chunk, "VcpuChunk.chunk")
            _u32(count, "VcpuChunk.count")
        if self.checksum_kind not in CHECKSUMS:
            _need(False, f"VcpuChunk.checksum_kind {self.checksum_kind!r} unknown")
        if not (type(values) is bytes or (type(values) is memoryview and values.readonly and values.c_contiguous
                                          and values.format == "B")):
            _need(False, "VcpuChunk.values must be bytes (or a read-only byte memoryview)")
        if self.reg_ids or not self.ids_le:
            lay = _layout_ids(tuple(self.reg_ids))
            if self.ids_le and self.ids_le != lay.ids_le:
                _need(False, "VcpuChunk: regIds and regIdsLe differ", "bad-chunk")
        else:
            lay = _layout_le(self.ids_le)
        object.__setattr__(self, "reg_ids", lay.ids)
        object.__setattr__(self, "ids_le", lay.ids_le)
        want_len = lay.total * (count or 1)
        if want_len != len(values):
            _need(False, f"VcpuChunk {vcpu}/{chunk}: {len(values)} value bytes for registers needing {want_len}",
                  "bad-chunk")
        want = _checksum(self.checksum_kind, self._parts())
        if not self.checksum:
            object.__setattr__(self, "checksum", want)
        elif self.checksum != want:
            _need(False, f"VcpuChunk {vcpu}/{chunk}: {self.checksum_kind} checksum mismatch", "bad-checksum")

    @property
    def vcpus(self) -> range:
        """The vCPUs this chunk carries."""
        return range(self.vcpu, self.vcpu + max(1, self.count))

    def _parts(self) -> tuple[bytes, ...]:
        head = (struct.pack("<III", self.vcpu, self.chunk, self.count) if self.count
                else struct.pack("<II", self.vcpu, self.chunk))
        return head, self.ids_le, self.values

    def covered(self) -> bytes:
        """The bytes the checksum covers (chunk_bytes); the checksum itself is computed part by part."""
        return b"".join(self._parts())

    @classmethod
    def build(cls, vm_id: str, vcpu: int, chunk: int, regs: Sequence[tuple[int, int]],
              checksum_kind: str = "crc32") -> "VcpuChunk":
        ids = tuple(r for r, _ in regs)
        lay = _layout_ids(ids)
        return cls(vm_id, vcpu, chunk, (), _pack(lay, [v for _, v in regs]), checksum_kind, ids_le=lay.ids_le)

    @classmethod
    def build_multi(cls, vm_id: str, first_vcpu: int, chunk: int, reg_ids: Sequence[int],
                    values: Sequence[Sequence[int]], checksum_kind: str = "crc32") -> "VcpuChunk":
        """Protocol 2: vCPUs first_vcpu.. (one value list each, all for reg_ids) in one chunk."""
        lay = _layout_ids(tuple(reg_ids))
        _need(len(values) >= 1, "VcpuChunk.build_multi: no vCPU")
        data = b"".join(_pack(lay, vals) for vals in values)
        return cls(vm_id, first_vcpu, chunk, (), data, checksum_kind, ids_le=lay.ids_le, count=len(values))

    def registers(self) -> list[tuple[int, int]]:
        """(id, value) of a single-vCPU chunk (the first vCPU's of a multi-vCPU one: use per_vcpu)."""
        return self.per_vcpu()[self.vcpu]

    def per_vcpu(self) -> dict[int, list[tuple[int, int]]]:
        lay = _layout_le(self.ids_le)
        out = {}
        for i, vals in zip(self.vcpus, struct.iter_unpack(lay.fmt, self.values) if lay.total else
                           ((),) * max(1, self.count)):
            if lay.wide:
                vals = list(vals)
                for k in lay.wide:
                    vals[k] = int.from_bytes(vals[k], "little")
            out[i] = list(zip(lay.ids, vals))
        return out


def _pack(lay: _Layout, vals: Sequence[int]) -> bytes:
    vals = list(vals)
    try:
        for i in lay.wide:
            vals[i] = int(vals[i]).to_bytes(lay.sizes[i], "little")
        return struct.pack(lay.fmt, *vals)
    except (OverflowError, struct.error) as e:
        raise LocalProtocolError(f"register value does not fit its size: {e}", "bad-chunk") from None


@dataclass(frozen=True, slots=True)
class StreamEnd:
    vm_id: str
    vcpus: int
    chunks: int
    digest: bytes

    def __post_init__(self) -> None:
        _text(self.vm_id, "StreamEnd.vm_id", 256)
        _u32(self.vcpus, "StreamEnd.vcpus")
        _u32(self.chunks, "StreamEnd.chunks")
        _need(isinstance(self.digest, bytes) and len(self.digest) == 32, "StreamEnd.digest must be 32 bytes")


@dataclass(frozen=True, slots=True)
class Commit:
    migration_id: str
    digest: bytes

    def __post_init__(self) -> None:
        _text(self.migration_id, "Commit.migration_id", 256)
        _need(isinstance(self.digest, bytes) and len(self.digest) == 32, "Commit.digest must be 32 bytes")


@dataclass(frozen=True, slots=True)
class Abort:
    reason: str
    code: str = ""

    def __post_init__(self) -> None:
        _text(self.reason, "Abort.reason", 65536)
        _text(self.code, "Abort.code", 64)


@dataclass(frozen=True, slots=True)
class Inquiry:
    """Protocol 5: "what did you decide for this migration, and what do you hold of this VM?" """
    migration_id: str
    vm_id: str

    def __post_init__(self) -> None:
        _text(self.migration_id, "Inquiry.migration_id", 256)
        _text(self.vm_id, "Inquiry.vm_id", 256)


ANSWER_OUTCOMES = ("", "open", "committed", "aborted", "in-doubt", "lost")   # "" = no record (daemon/journal.py)


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer to an Inquiry: the journal's outcome and last phase for the migration ("" = no record) and the
    VM's state here now ("" = not held)."""
    migration_id: str
    vm_id: str
    outcome: str
    phase: str
    vm_state: str

    def __post_init__(self) -> None:
        _text(self.migration_id, "Answer.migration_id", 256)
        _text(self.vm_id, "Answer.vm_id", 256)
        _need(self.outcome in ANSWER_OUTCOMES, f"Answer.outcome {self.outcome!r} is not one of {ANSWER_OUTCOMES}")
        _text(self.phase, "Answer.phase", 32)
        _text(self.vm_state, "Answer.vm_state", 32)


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection at a frame boundary."""


Event = Union[Hello, Capabilities, PlanProposal, PlanAccept, Preflight, VcpuChunk, StreamEnd, Commit, Abort, Inquiry,
              Answer]

# --- the wire codec (Cap'n Proto readers/builders never leave this section) ------------------------------------
_WIRE_NAMES = {Hello: "hello", Capabilities: "capabilities", PlanProposal: "planProposal", PlanAccept: "planAccept",
               Preflight: "preflight", VcpuChunk: "vcpuChunk", StreamEnd: "streamEnd", Commit: "commit",
               Abort: "abort", Inquiry: "inquiry", Answer: "answer"}


def _schema():
    from .schemas import load_capnp      # lazy: the state machine and events do not need Cap'n Proto
    return load_capnp("peer.capnp")


def encode(event: Event) -> bytes:
    if type(event) is VcpuChunk:
        if event.wire:
            return event.wire
        data = b"".join(_chunk_parts(event))
        object.__setattr__(event, "wire", data)      # chunks may be encoded ahead of the stream (source side)
        return data
    return _encode(event)


def encode_parts(event: Event) -> tuple:
    """encode(event) as pieces to write back to back (a VcpuChunk's values are not copied: a writer joins the
    pieces of several events into one write)."""
    if type(event) is VcpuChunk:
        return (event.wire,) if event.wire else _chunk_parts(event)
    return (_encode(event),)


def _encode(event: Event) -> bytes:
    msg = _schema().Message.new_message()
    name = _WIRE_NAMES[type(event)]
    m = msg.init(name)
    if isinstance(event, Hello):
        m.versions = list(event.versions)
        m.role = event.role
        m.node = event.node
    elif isinstance(event, Capabilities):
        m.format, m.doc = event.format, event.doc
    elif isinstance(event, PlanProposal):
        m.migrationId, m.vmId, m.vcpus, m.format = event.migration_id, event.vm_id, event.vcpus, event.format
        m.plan, m.digest, m.vmProfile = event.plan, event.digest, event.vm_profile
    elif isinstance(event, (PlanAccept, Commit)):
        m.migrationId, m.digest = event.migration_id, event.digest
    elif isinstance(event, Preflight):
        m.ok, m.detail, m.events = event.ok, event.detail, list(event.events)
    elif isinstance(event, VcpuChunk):
        m.vmId, m.vcpu, m.chunk = event.vm_id, event.vcpu, event.chunk
        m.regIdsLe = event.ids_le
        m.values, m.checksumKind, m.checksum = event.values, event.checksum_kind, event.checksum
        if event.count:
            m.vcpuCount = event.count
    elif isinstance(event, StreamEnd):
        m.vmId, m.vcpus, m.chunks, m.digest = event.vm_id, event.vcpus, event.chunks, event.digest
    elif isinstance(event, Abort):
        m.reason, m.code = event.reason, event.code
    elif isinstance(event, Inquiry):
        m.migrationId, m.vmId = event.migration_id, event.vm_id
    elif isinstance(event, Answer):
        m.migrationId, m.vmId, m.outcome, m.phase, m.vmState = (event.migration_id, event.vm_id, event.outcome,
                                                                event.phase, event.vm_state)
    return msg.to_bytes()


def _decode_reader(r) -> Event:
    w = r.which()
    m = getattr(r, w)
    if w == "hello":
        return Hello(tuple(m.versions), str(m.role), m.node)
    if w == "capabilities":
        return Capabilities(m.format, bytes(m.doc))
    if w == "planProposal":
        return PlanProposal(m.migrationId, m.vmId, m.vcpus, m.format, bytes(m.plan), bytes(m.digest),
                            bytes(m.vmProfile))
    if w == "planAccept":
        return PlanAccept(m.migrationId, bytes(m.digest))
    if w == "preflight":
        return Preflight(m.ok, m.detail, tuple(m.events))
    if w == "vcpuChunk":
        return VcpuChunk(m.vmId, m.vcpu, m.chunk, tuple(m.regIds) if m._has("regIds") else (), m.values,
                         str(m.checksumKind), _received(m.checksum), m.regIdsLe, m.vcpuCount)
    if w == "streamEnd":
        return StreamEnd(m.vmId, m.vcpus, m.chunks, bytes(m.digest))
    if w == "commit":
        return Commit(m.migrationId, bytes(m.digest))
    if w == "abort":
        return Abort(m.reason, m.code)
    if w == "inquiry":
        return Inquiry(m.migrationId, m.vmId)
    if w == "answer":
        return Answer(m.migrationId, m.vmId, m.outcome, m.phase, m.vmState)
    raise LocalProtocolError(f"unknown message kind {w!r}", "unknown-message")


def _received(checksum: bytes) -> bytes:
    """A received chunk's checksum: never empty (an empty one would mean "compute it" to VcpuChunk)."""
    if not checksum:
        raise LocalProtocolError("VcpuChunk without a checksum", "bad-checksum")
    return checksum


def decode(frame: bytes | memoryview, limits: Limits = Limits()) -> Event:
    """One frame -> one event. Anything wrong -> RemoteProtocolError naming it."""
    try:
        ev = _fast_chunk(frame, limits)
        if ev is not None:
            return ev
    except LocalProtocolError as e:
        raise RemoteProtocolError(str(e), e.what) from e
    schema = _schema()
    if type(frame) is not bytes:
        frame = bytes(frame)
    try:
        with schema.Message.from_bytes(frame, traversal_limit_in_words=limits.traversal_limit_in_words,
                                       nesting_limit=limits.nesting_limit) as r:
            if r.which() == "vcpuChunk":
                c = r.vcpuChunk
                n = max(len(c.regIds), len(c.regIdsLe) // 8)
                if n > limits.max_registers_per_chunk:
                    raise LocalProtocolError(f"VcpuChunk carries {n} registers; the limit is "
                                             f"{limits.max_registers_per_chunk}", "chunk-too-large")
            return _decode_reader(r)
    except LocalProtocolError as e:
        raise RemoteProtocolError(str(e), e.what) from e
    except ProtocolError:
        raise
    except UnicodeDecodeError as e:
        raise RemoteProtocolError(f"message text is not UTF-8: {e.reason}", "malformed-message") from None
    except Exception as e:    # capnp.KjException and anything the decoder raises on hostile input
        desc = getattr(e, "description", None) or str(e) or type(e).__name__
        raise RemoteProtocolError(f"undecodable Cap'n Proto message: {desc.splitlines()[0][:300]}",
                                  "malformed-message") from None


_KIND_TAG = {k: i for i, k in enumerate(CHECKSUMS)}


def _chain_entry(ev: VcpuChunk) -> bytes:
    """Protocol 2's StreamEnd digest is sha256(tag || entry(chunk 1) || entry(chunk 2) || ...), entry = u32 vcpu,
    u32 chunk, u32 count, u8 checksum kind, u8 checksum length, checksum. Sound without hashing the register
    bytes twice: TLS (AEAD) already protects every byte in transit; each chunk's checksum covers that chunk's
    header, register ids and values end to end (encoder to decoder), and is verified on arrival; the chain
    binds each chunk's identity and checksum in order, so a lost, repeated, reordered or substituted chunk
    changes the digest both Commits carry."""
    return struct.pack("<IIIBB", ev.vcpu, ev.chunk, ev.count, _KIND_TAG[ev.checksum_kind], len(ev.checksum)) \
        + ev.checksum


# --- VcpuChunk's wire form without the Cap'n Proto library (the stream's hot path) ------------------------------
# A chunk is ~99% one Data field (values). The library would copy it into a builder and out again on the way out,
# and out of the message on the way in, with per-field Python overhead; these two functions write and read that
# one message shape directly: a single-segment frame, Message (1 data word, 1 pointer; union tag 5 = vcpuChunk)
# -> VcpuChunk (2 data words, 5 pointers) -> vmId, regIdsLe, checksum, values. The bytes are standard Cap'n
# Proto: any reader decodes them (tests/test_session_chunks.py checks against the library, both ways). A frame
# of any other shape (several segments, far pointers, the older regIds list, other struct sizes, anything out of
# bounds or odd) goes to the library's reader, which decides as before.
_MSG_VCPU_CHUNK = 5                       # Message union tag of vcpuChunk (peer.capnp)
_VC_DATA_WORDS, _VC_PTRS = 2, 5           # VcpuChunk's struct size; fields: see _chunk_head
_VC_FIXED = struct.Struct("<II QQQ IIHHI QQQQQ")   # segment table, Message, its pointer, VcpuChunk data + pointers
_ROOT = 0x0001_0001_0000_0000             # struct pointer, offset 0, 1 data word, 1 pointer
_TO_CHUNK = (_VC_PTRS << 48) | (_VC_DATA_WORDS << 32)   # struct pointer to the next word


def _words(n: int) -> int:
    return (n + 7) >> 3


def _byte_list(ptr_word: int, target_word: int, n: int) -> int:
    """A list pointer (element size: byte, n elements) at ptr_word to target_word."""
    return ((n << 35) | (2 << 32) | ((target_word - ptr_word - 1) << 2) | 1) if n else 0


def _pad(n: int) -> bytes:
    return b"\0" * (-n & 7)


def _chunk_parts(ev: "VcpuChunk") -> tuple:
    """The frame of a VcpuChunk as (head, values, padding): written back to back they are encode(ev)."""
    vm = ev.vm_id.encode() + b"\0"
    ids, ck, vals = ev.ids_le, ev.checksum, ev.values
    p0 = 5                                 # word of the VcpuChunk's first pointer (within the segment)
    w_vm = p0 + _VC_PTRS                   # objects follow in this order: vmId, regIdsLe, checksum, values
    w_ids = w_vm + _words(len(vm))
    w_ck = w_ids + _words(len(ids))
    w_vals = w_ck + _words(len(ck))
    seg = w_vals + _words(len(vals))
    head = _VC_FIXED.pack(0, seg, _ROOT, _MSG_VCPU_CHUNK, _TO_CHUNK,
                          ev.vcpu, ev.chunk, _KIND_TAG[ev.checksum_kind], 0, ev.count,
                          _byte_list(p0, w_vm, len(vm)), 0, _byte_list(p0 + 2, w_vals, len(vals)),
                          _byte_list(p0 + 3, w_ck, len(ck)), _byte_list(p0 + 4, w_ids, len(ids)))
    return (b"".join((head, vm, _pad(len(vm)), ids, _pad(len(ids)), ck, _pad(len(ck)))), vals, _pad(len(vals)))


_U64 = struct.Struct("<Q")


def _fast_chunk(frame: bytes, limits: Limits) -> "VcpuChunk | None":
    """A VcpuChunk read straight from a frame of the shape _chunk_parts writes (any pointer offsets / object
    order, smaller or larger struct sizes, every reference bounds-checked); None: let the library decide."""
    n = len(frame)
    if n < 24 or frame[0:4] != b"\0\0\0\0":
        return None
    seg = struct.unpack_from("<I", frame, 4)[0]
    if 8 + 8 * seg != n:
        return None
    u64 = _U64.unpack_from

    def struct_at(p: int):                 # (first word, data words, pointer words) of a struct pointer at p
        v = u64(frame, 8 + 8 * p)[0]
        if v & 3 or not v:
            return None
        off = ((v & 0xFFFFFFFF) >> 2) - ((v & 0x80000000) >> 1)      # signed 30 bits
        start, dw, pw = p + 1 + off, (v >> 32) & 0xFFFF, v >> 48
        return (start, dw, pw) if 0 <= start and start + dw + pw <= seg else None

    m = struct_at(0)
    if m is None or m[1] < 1 or m[2] < 1 or struct.unpack_from("<H", frame, 8 + 8 * m[0])[0] != _MSG_VCPU_CHUNK:
        return None
    c = struct_at(m[0] + m[1])
    if c is None:
        return None
    start, dw, pw = c
    d = 8 + 8 * start
    vcpu, chunk = struct.unpack_from("<II", frame, d) if dw >= 1 else (0, 0)
    kind, _, count = struct.unpack_from("<HHI", frame, d + 8) if dw >= 2 else (0, 0, 0)
    if kind >= len(CHECKSUMS):
        return None

    def data(i: int):                      # (byte offset, length) of Data pointer i; (0, 0) when null
        if i >= pw:
            return 0, 0
        p = start + dw + i
        v = u64(frame, 8 + 8 * p)[0]
        if not v:
            return 0, 0
        if v & 3 != 1 or (v >> 32) & 7 != 2:
            return None
        off = ((v & 0xFFFFFFFF) >> 2) - ((v & 0x80000000) >> 1)
        first, k = p + 1 + off, v >> 35
        return (8 + 8 * first, k) if 0 <= first and first + _words(k) <= seg else None

    if pw > 1 and u64(frame, 8 + 8 * (start + dw + 1))[0]:
        return None                        # the older regIds list form
    f_vm, f_vals, f_ck, f_ids = data(0), data(2), data(3), data(4)
    if f_vm is None or f_vals is None or f_ck is None or f_ids is None:
        return None
    if f_vm[1]:
        if frame[f_vm[0] + f_vm[1] - 1] != 0:
            return None
        vm = bytes(frame[f_vm[0]:f_vm[0] + f_vm[1] - 1])
        if b"\0" in vm or not vm.isascii():
            return None                    # unusual text: the library's reading (and its errors) applies
        vm_id = vm.decode("ascii")
    else:
        vm_id = ""
    if f_ids[1] // 8 > limits.max_registers_per_chunk:
        raise LocalProtocolError(f"VcpuChunk carries {f_ids[1] // 8} registers; the limit is "
                                 f"{limits.max_registers_per_chunk}", "chunk-too-large")
    ids_le = bytes(frame[f_ids[0]:f_ids[0] + f_ids[1]])
    values = memoryview(frame)[f_vals[0]:f_vals[0] + f_vals[1]].toreadonly()     # no copy: a view of the frame
    checksum = bytes(frame[f_ck[0]:f_ck[0] + f_ck[1]])
    return VcpuChunk(vm_id, vcpu, chunk, (), values, CHECKSUMS[kind], _received(checksum), ids_le, count)


# --- the state machine --------------------------------------------------------------------------------------------
S, D = SOURCE, DESTINATION
TRANSITIONS: dict[tuple[type, str, type], type] = {
    (START, S, Hello): GREETING,
    (GREETING, D, Hello): GREETED,
    (GREETED, D, Capabilities): CAPS_KNOWN,
    (CAPS_KNOWN, S, PlanProposal): PROPOSED,
    (PROPOSED, D, PlanAccept): AGREED,
    (AGREED, D, Preflight): READY,
    (READY, S, VcpuChunk): STREAMING,
    (STREAMING, S, VcpuChunk): STREAMING,
    (READY, S, StreamEnd): STREAMED,
    (STREAMING, S, StreamEnd): STREAMED,
    (STREAMED, D, Commit): COMMITTING,
    (COMMITTING, S, Commit): DONE,          # protocol 4: RELEASED (Session._process)
    (RELEASED, D, Commit): DONE,
    (CAPS_KNOWN, S, Inquiry): INQUIRED,
    (INQUIRED, D, Answer): DONE,
}
ACKED_COMMIT_SINCE = 4
INQUIRY_SINCE = 5
ABORTABLE = frozenset({START, GREETING, GREETED, CAPS_KNOWN, PROPOSED, AGREED, READY, STREAMING, STREAMED,
                       COMMITTING, INQUIRED})


class Session:
    def __init__(self, role: str, limits: Limits = Limits(), versions: Sequence[int] = PROTOCOL_VERSIONS) -> None:
        if role not in (SOURCE, DESTINATION):
            raise LocalProtocolError(f"role {role!r} is neither source nor destination")
        self.our_role = role
        self.their_role = DESTINATION if role == SOURCE else SOURCE
        self.limits = limits
        self.versions = tuple(versions)
        self.state: type = START
        self.version: int | None = None
        self.their_hello: Hello | None = None
        self.capabilities: Capabilities | None = None
        self.proposal: PlanProposal | None = None
        self.inquiry: Inquiry | None = None
        self.abort: Abort | None = None
        self.aborted_by: str | None = None
        self.error: ProtocolError | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self._decoder = FrameDecoder(limits)
        self._decoder.max_frame = min(limits.max_preplan_frame_bytes, limits.max_frame_bytes)
        self._eof = False
        self._digest_h = None               # protocol 1: every chunk's bytes; 2: the chain (see _chain_entry)
        self._chunks = 0
        self._next_chunk: dict[int, int] = {}
        self._stream_digest: bytes | None = None

    # --- public API
    def receive_data(self, data: bytes) -> bool:
        """Bytes from the peer (b"": end of stream). True when next_event() may have an event; False: it would
        say NEED_DATA (a caller may go on receiving without asking)."""
        if self._eof and data:
            raise LocalProtocolError("receive_data after end of stream")
        if not data:
            self._eof = True
            return True
        self.bytes_received += len(data)
        return self._decoder.feed(data)

    MAX_RESERVE = 256 << 20

    def reserve(self, nbytes: int) -> None:
        """Destination: about nbytes of chunks are about to arrive (the plan tells how many vCPUs and registers).
        Their frames are then copied into memory taken now (FrameDecoder.reserve, at most MAX_RESERVE), and
        received chunks' values are read-only views of it; released for new frames at StreamEnd."""
        self._decoder.reserve(min(max(0, nbytes), self.MAX_RESERVE))

    def next_event(self):
        if self.state is ERROR:
            raise RemoteProtocolError(f"session is in ERROR state ({self.error})", "error-state")
        try:
            frame = self._decoder.next_frame()
            if frame is None:
                if not self._eof:
                    return NEED_DATA
                if self._decoder.pending:
                    raise RemoteProtocolError(f"connection closed inside a frame ({self._decoder.pending} bytes "
                                              f"pending)", "truncated-frame")
                return ConnectionClosed()
            event = decode(frame, self.limits)
            self._process(self.their_role, event)
            return event
        except LocalProtocolError as e:
            self._fail(e)
            raise RemoteProtocolError(str(e), e.what) from e
        except RemoteProtocolError as e:
            self._fail(e)
            raise

    def send(self, event: Event) -> bytes:
        parts = self.send_parts(event)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def send_parts(self, event: Event) -> tuple:
        """send(), the bytes as pieces to write back to back (encode_parts): a writer coalescing several
        events joins all their pieces once."""
        if self.state is ERROR:
            raise LocalProtocolError(f"session is in ERROR state ({self.error})", "error-state")
        if type(event) not in _WIRE_NAMES:
            raise LocalProtocolError(f"cannot send {type(event).__name__}")
        try:
            parts = encode_parts(event)
            size = sum(map(len, parts))
            if size > self.limits.max_frame_bytes:
                raise LocalProtocolError(f"{type(event).__name__} encodes to {size} bytes; the frame limit is "
                                         f"{self.limits.max_frame_bytes} (send smaller chunks)", "frame-too-large")
            self._process(self.our_role, event)
        except LocalProtocolError as e:
            self._fail(e)
            raise
        self.bytes_sent += size
        return parts

    def send_failed(self) -> None:
        """The transport could not deliver what send() returned: the session cannot continue."""
        self._fail(LocalProtocolError("send failed", "send-failed"))

    def stream_end(self) -> StreamEnd:
        """The StreamEnd for everything sent so far (source side)."""
        if self.proposal is None:
            raise LocalProtocolError("no plan proposal yet")
        return StreamEnd(self.proposal.vm_id, self.proposal.vcpus, self._chunks, self._digest.digest())

    @property
    def stream_digest(self) -> bytes | None:
        """The whole-set digest once StreamEnd passed (either direction)."""
        return self._stream_digest

    # --- internals
    @property
    def _digest(self):
        if self._digest_h is None:
            self._digest_h = hashlib.sha256(STREAM_DIGEST_TAG_V2 if (self.version or 1) >= 2 else b"")
        return self._digest_h

    @_digest.setter
    def _digest(self, h) -> None:
        self._digest_h = h

    def _fail(self, e: ProtocolError) -> None:
        self.state = ERROR
        self.error = self.error or e

    def _process(self, sender: str, ev: Event) -> None:
        who = "we" if sender == self.our_role else "the peer"
        if isinstance(ev, Abort):
            if self.state in ABORTABLE:
                self.state, self.abort, self.aborted_by = ABORTED, ev, sender
                return
            if self.state is ABORTED:
                return
            raise LocalProtocolError(f"Abort from {sender} in state {self.state!r}", "unexpected-message")
        if self.state is ABORTED:
            if sender == self.our_role:
                raise LocalProtocolError(f"cannot send {type(ev).__name__}: the migration was aborted",
                                         "unexpected-message")
            return            # crossed the Abort on the wire: delivered, ignored by the state machine
        new = TRANSITIONS.get((self.state, sender, type(ev)))
        if new is None:
            raise LocalProtocolError(f"{type(ev).__name__} from {sender} ({who}) is not allowed in state "
                                     f"{self.state!r}", "unexpected-message")
        getattr(self, "_check_" + type(ev).__name__)(sender, ev)
        if new is DONE and self.state is COMMITTING and (self.version or 1) >= ACKED_COMMIT_SINCE:
            new = RELEASED                  # protocol 4: the destination acknowledges the source's Commit
        self.state = new
        if new is AGREED:                   # the plan is agreed: chunks may now use the full frame size
            self._decoder.max_frame = self.limits.max_frame_bytes

    def _check_Hello(self, sender: str, ev: Hello) -> None:
        _need(ev.role == sender, f"Hello claims role {ev.role!r} but comes from the {sender}", "wrong-role")
        if sender == self.our_role:
            # what our Hello advertises is what we speak (the source sends first, before it knows the peer)
            ours = set(ev.versions) & set(self.versions)
            _need(bool(ours), f"Hello offers versions {list(ev.versions)}; this session speaks "
                              f"{list(self.versions)}", "version-mismatch")
            self.versions = tuple(v for v in self.versions if v in ours)
        if sender == self.their_role:
            self.their_hello = ev
            common = set(ev.versions) & set(self.versions)
            _need(bool(common), f"no common protocol version: peer speaks {list(ev.versions)}, we speak "
                                f"{list(self.versions)} (upgrade the older daemon)", "version-mismatch")
            self.version = max(common)
        if sender == self.our_role and self.their_hello is not None:     # destination: it answers second
            common = set(self.their_hello.versions) & set(self.versions)
            _need(bool(common), f"no common protocol version: peer speaks {list(self.their_hello.versions)}, we "
                                f"speak {list(self.versions)}", "version-mismatch")
            self.version = max(common)

    def _check_Capabilities(self, sender: str, ev: Capabilities) -> None:
        self.capabilities = ev

    def _check_PlanProposal(self, sender: str, ev: PlanProposal) -> None:
        self.proposal = ev

    def _check_PlanAccept(self, sender: str, ev: PlanAccept) -> None:
        p = self.proposal
        _need(ev.migration_id == p.migration_id, f"PlanAccept for migration {ev.migration_id!r}, proposed "
                                                 f"{p.migration_id!r}", "wrong-migration")
        _need(ev.digest == p.digest, "PlanAccept digest differs from the proposed plan's: the two daemons did not "
                                     "compute the same plan", "plan-digest-mismatch")

    def _check_Preflight(self, sender: str, ev: Preflight) -> None:
        pass

    def _check_VcpuChunk(self, sender: str, ev: VcpuChunk) -> None:
        # once per chunk: messages are formatted only when a check fails
        p = self.proposal
        if ev.vm_id != p.vm_id:
            _need(False, f"VcpuChunk for VM {ev.vm_id!r}; the plan is for {p.vm_id!r}", "wrong-vm")
        if ev.vcpu >= p.vcpus:
            _need(False, f"VcpuChunk for vCPU {ev.vcpu}; the plan has {p.vcpus} vCPUs", "bad-chunk")
        if len(ev.reg_ids) > self.limits.max_registers_per_chunk:
            _need(False, f"VcpuChunk carries {len(ev.reg_ids)} registers; the limit is "
                         f"{self.limits.max_registers_per_chunk}", "chunk-too-large")
        if ev.count:
            _need(self.version is not None and self.version >= 2, f"VcpuChunk for {ev.count} vCPUs needs protocol "
                                                                  f"2; this session speaks {self.version}",
                  "bad-chunk")
            _need(ev.vcpu + ev.count <= p.vcpus, f"VcpuChunk for vCPUs {ev.vcpu}..{ev.vcpu + ev.count - 1}; the "
                                                 f"plan has {p.vcpus} vCPUs", "bad-chunk")
        since = CHECKSUM_SINCE[ev.checksum_kind]
        if since > (self.version or 1):
            _need(False, f"VcpuChunk with a {ev.checksum_kind} checksum needs protocol {since}; this session "
                         f"speaks {self.version}", "bad-checksum")
        nxt = self._next_chunk
        vcpus = ev.vcpus
        get = nxt.get
        for i in vcpus:
            if get(i, 0) != ev.chunk:
                _need(False, f"vCPU {i}: chunk {ev.chunk} arrived, expected {get(i, 0)}", "chunk-order")
        nxt.update(dict.fromkeys(vcpus, ev.chunk + 1))
        self._chunks += 1
        if self.version is not None and self.version >= 2:
            self._digest.update(_chain_entry(ev))
        else:
            for part in ev._parts():
                self._digest.update(part)

    def _check_StreamEnd(self, sender: str, ev: StreamEnd) -> None:
        p = self.proposal
        _need(ev.vm_id == p.vm_id and ev.vcpus == p.vcpus, f"StreamEnd for {ev.vm_id!r}/{ev.vcpus} vCPUs does not "
                                                           f"match the plan ({p.vm_id!r}/{p.vcpus})", "bad-stream-end")
        missing = sorted(set(range(p.vcpus)) - set(self._next_chunk))
        _need(not missing, f"StreamEnd before any chunk of vCPU(s) {missing[:16]}", "incomplete-stream")
        _need(ev.chunks == self._chunks, f"StreamEnd counts {ev.chunks} chunks; {self._chunks} were streamed",
              "incomplete-stream")
        _need(ev.digest == self._digest.digest(), "StreamEnd digest does not match the chunks streamed",
              "stream-digest-mismatch")
        self._stream_digest = ev.digest
        self._decoder.reserve(0)                # the chunks keep what they use of a reservation

    def _check_Commit(self, sender: str, ev: Commit) -> None:
        _need(ev.migration_id == self.proposal.migration_id, f"Commit for migration {ev.migration_id!r}",
              "wrong-migration")
        _need(ev.digest == self._stream_digest, "Commit digest differs from the streamed set's digest",
              "commit-digest-mismatch")

    def _check_Inquiry(self, sender: str, ev: Inquiry) -> None:
        _need((self.version or 1) >= INQUIRY_SINCE, f"Inquiry in a protocol {self.version} session (needs "
                                                    f"{INQUIRY_SINCE})", "unexpected-message")
        self.inquiry = ev

    def _check_Answer(self, sender: str, ev: Answer) -> None:
        _need(ev.migration_id == self.inquiry.migration_id and ev.vm_id == self.inquiry.vm_id,
              f"Answer about {ev.migration_id!r} / {ev.vm_id!r}, asked about {self.inquiry.migration_id!r} / "
              f"{self.inquiry.vm_id!r}", "wrong-migration")
