"""Peer-session events: the messages two daemons exchange (validated on construction), chunk layouts and
checksums. Pure data; the wire codec is wire.py, the conversation machine.py."""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from typing import Sequence, Union

import xxhash

from .. import regid
from ..regset import RegisterSet, layout, layout_le, pack
from ..errors import LocalProtocolError


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


def register_size(reg_id: int) -> int:
    """Value bytes of a register on the wire (KVM_REG_SIZE)."""
    return regid.size_bytes(reg_id)


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
            lay = layout(tuple(self.reg_ids))
            if self.ids_le and self.ids_le != lay.ids_le:
                _need(False, "VcpuChunk: regIds and regIdsLe differ", "bad-chunk")
        else:
            lay = layout_le(self.ids_le)
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
    def build(cls, vm_id: str, vcpu: int, chunk: int, regs: RegisterSet | Sequence[tuple[int, int]],
              checksum_kind: str = "crc32") -> "VcpuChunk":
        """One vCPU's registers (a RegisterSet's bytes go as they are)."""
        rs = RegisterSet.from_pairs(regs)
        return cls(vm_id, vcpu, chunk, (), bytes(rs.data), checksum_kind, ids_le=rs.ids_le)

    @classmethod
    def build_multi(cls, vm_id: str, first_vcpu: int, chunk: int, reg_ids: Sequence[int],
                    values: Sequence[RegisterSet | Sequence[int]], checksum_kind: str = "crc32") -> "VcpuChunk":
        """Protocol 2: vCPUs first_vcpu.. (a RegisterSet or a value list each, all for reg_ids) in one chunk."""
        lay = layout(tuple(reg_ids))
        _need(len(values) >= 1, "VcpuChunk.build_multi: no vCPU")
        parts = []
        for vals in values:
            if isinstance(vals, RegisterSet):
                _need(vals.ids_le == lay.ids_le, "VcpuChunk.build_multi: a vCPU with another register list")
                parts.append(bytes(vals.data))
            else:
                parts.append(pack(lay, vals))
        return cls(vm_id, first_vcpu, chunk, (), b"".join(parts), checksum_kind, ids_le=lay.ids_le,
                   count=len(values))

    def registers(self) -> RegisterSet:
        """The registers of a single-vCPU chunk (the first vCPU's of a multi-vCPU one: use per_vcpu)."""
        return self.per_vcpu()[self.vcpu]

    def per_vcpu(self) -> dict[int, RegisterSet]:
        """Each vCPU's registers: slices of the received bytes, decoded to integers only when read."""
        lay = layout_le(self.ids_le)
        step = lay.total
        return {i: RegisterSet(lay, self.values[k * step:(k + 1) * step]) for k, i in enumerate(self.vcpus)}


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


def _received(checksum: bytes) -> bytes:
    """A received chunk's checksum: never empty (an empty one would mean "compute it" to VcpuChunk)."""
    if not checksum:
        raise LocalProtocolError("VcpuChunk without a checksum", "bad-checksum")
    return checksum


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
