"""The VMM agent's unix-socket protocol (sans-IO): frames between the in-process agent (daemon/vmm/agent.c,
loaded into QEMU with LD_PRELOAD) and the local daemon. Layout: protocol/schemas/AGENT.md.

A fixed little-endian binary layout, not Cap'n Proto: the agent lives inside a VMM's address space, where a
C++ Cap'n Proto runtime has no place; every message is a 12-byte header and a few fixed-size records that the
C side reads with one bounds check each. The header carries a version; the program carries the plan digest.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

MAGIC = b"IVDA"
VERSION = 1
MAX_BODY = 1 << 20
HEADER = struct.Struct("<4sHHI")             # magic, version, type, body length


class WireError(ValueError):
    """A frame that breaks the layout: says which field and why."""


class T(enum.IntEnum):
    HELLO = 1          # agent -> daemon
    PROGRAM = 2        # daemon -> agent: an ApplyProgram (protocol/program.py encode())
    NO_PROGRAM = 3     # daemon -> agent: pass through, with the reason
    EVENT = 4          # agent -> daemon: one decision
    SNAPSHOT = 5       # agent -> daemon: a vCPU's register list and ID-like values, before its first KVM_RUN
    VERIFY = 6         # agent -> daemon: read-back of the program's registers on one vCPU


class Role(enum.IntEnum):
    UNKNOWN = 0
    SOURCE = 1
    DESTINATION = 2


class Kind(enum.IntEnum):
    """EVENT kinds."""
    OVERRIDE = 1       # the program's planned value written instead of the VMM's (not a failure)
    DECISION = 2       # a KVM_SET_ONE_REG failed with errno; `action` (program.Action) was carried out
    CAP239 = 3         # KVM_ENABLE_CAP(239) before the first vCPU; errno 0 = enabled
    LISTED = 4         # registers added to KVM_GET_REG_LIST (reg_id field = how many)
    PASSTHROUGH = 5    # no program (no daemon, none offered, digest mismatch): the agent only passes through


_HELLO = struct.Struct("<IBBH32s")            # pid, role, flags, reserved, expected plan digest (zeros: none)
_EVENT = struct.Struct("<IiBBBBQQQ")          # vcpu, errno, kind, action, verdict, reserved, reg_id, given, final
_SNAP = struct.Struct("<IIII")                # vcpu, n_list, n_values, KVM_ARM_VCPU_INIT features[0]
_VERIFY = struct.Struct("<IIII")              # vcpu, n_checked, n_bad, phase (1 = after init, 2 = first run)
_BAD = struct.Struct("<QQQiI")                # reg_id, want, got, errno, reserved


@dataclass(frozen=True)
class Hello:
    pid: int
    role: Role
    vm: str
    migration: str
    digest: bytes = b""


@dataclass(frozen=True)
class Event:
    vcpu: int
    errno: int
    kind: Kind
    action: int
    verdict: int
    reg_id: int
    given: int
    final: int


@dataclass(frozen=True)
class Snapshot:
    vcpu: int
    reg_list: tuple[int, ...]
    values: tuple[tuple[int, int], ...]
    features: int = 0                                # the vCPU's init feature bits (word 0), as the VMM asked


@dataclass(frozen=True)
class Verify:
    vcpu: int
    checked: int
    phase: int
    bad: tuple[tuple[int, int, int, int], ...]      # (reg_id, want, got, errno)


def frame(t: T, body: bytes) -> bytes:
    if len(body) > MAX_BODY:
        raise WireError(f"{t.name} body of {len(body)} bytes exceeds {MAX_BODY}")
    return HEADER.pack(MAGIC, VERSION, t, len(body)) + body


def _str(b: bytes, off: int, what: str) -> tuple[str, int]:
    if off + 2 > len(b):
        raise WireError(f"HELLO: {what} length missing")
    (n,) = struct.unpack_from("<H", b, off)
    if off + 2 + n > len(b):
        raise WireError(f"HELLO: {what} of {n} bytes runs past the body")
    try:
        return b[off + 2:off + 2 + n].decode("utf-8"), off + 2 + n
    except UnicodeDecodeError:
        raise WireError(f"HELLO: {what} is not UTF-8") from None


def _pstr(s: str) -> bytes:
    b = s.encode()
    if len(b) > 255:
        raise WireError(f"string {s[:20]!r}... longer than 255 bytes")
    return struct.pack("<H", len(b)) + b


def encode_hello(h: Hello) -> bytes:
    return frame(T.HELLO, _HELLO.pack(h.pid, h.role, 0, 0, h.digest.ljust(32, b"\0")) + _pstr(h.vm)
                 + _pstr(h.migration))


def encode_no_program(reason: str) -> bytes:
    return frame(T.NO_PROGRAM, _pstr(reason[:255]))


def encode_event(e: Event) -> bytes:
    return frame(T.EVENT, _EVENT.pack(e.vcpu, e.errno, e.kind, e.action, e.verdict, 0, e.reg_id, e.given, e.final))


def encode_snapshot(s: Snapshot) -> bytes:
    return frame(T.SNAPSHOT, _SNAP.pack(s.vcpu, len(s.reg_list), len(s.values), s.features)
                 + struct.pack(f"<{len(s.reg_list)}Q", *s.reg_list)
                 + b"".join(struct.pack("<QQ", r, v) for r, v in s.values))


def encode_verify(v: Verify) -> bytes:
    return frame(T.VERIFY, _VERIFY.pack(v.vcpu, v.checked, len(v.bad), v.phase)
                 + b"".join(_BAD.pack(r, w, g, e, 0) for r, w, g, e in v.bad))


def decode_body(t: int, b: bytes):
    """One frame body -> Hello | bytes (PROGRAM) | str (NO_PROGRAM) | Event | Snapshot | Verify."""
    try:
        kind = T(t)
    except ValueError:
        raise WireError(f"unknown frame type {t}") from None
    if kind is T.HELLO:
        if len(b) < _HELLO.size:
            raise WireError(f"HELLO of {len(b)} bytes, shorter than {_HELLO.size}")
        pid, role, _, _, digest = _HELLO.unpack_from(b)
        vm, off = _str(b, _HELLO.size, "vm name")
        mig, off = _str(b, off, "migration id")
        try:
            r = Role(role)
        except ValueError:
            raise WireError(f"HELLO: unknown role {role}") from None
        return Hello(pid, r, vm, mig, b"" if digest == bytes(32) else digest)
    if kind is T.PROGRAM:
        return bytes(b)
    if kind is T.NO_PROGRAM:
        return _str(b, 0, "reason")[0]
    if kind is T.EVENT:
        if len(b) != _EVENT.size:
            raise WireError(f"EVENT of {len(b)} bytes, expected {_EVENT.size}")
        vcpu, err, k, act, verdict, _, rid, given, final = _EVENT.unpack(b)
        try:
            k = Kind(k)
        except ValueError:
            raise WireError(f"EVENT: unknown kind {k}") from None
        return Event(vcpu, err, k, act, verdict, rid, given, final)
    if kind is T.SNAPSHOT:
        if len(b) < _SNAP.size:
            raise WireError("SNAPSHOT header truncated")
        vcpu, nl, nv, feats = _SNAP.unpack_from(b)
        if len(b) != _SNAP.size + 8 * nl + 16 * nv:
            raise WireError(f"SNAPSHOT says {nl} ids and {nv} values, body has {len(b)} bytes")
        ids = struct.unpack_from(f"<{nl}Q", b, _SNAP.size)
        flat = struct.unpack_from(f"<{2 * nv}Q", b, _SNAP.size + 8 * nl)
        return Snapshot(vcpu, tuple(ids), tuple(zip(flat[0::2], flat[1::2])), feats)
    if len(b) < _VERIFY.size:
        raise WireError("VERIFY header truncated")
    vcpu, checked, nbad, phase = _VERIFY.unpack_from(b)
    if len(b) != _VERIFY.size + _BAD.size * nbad:
        raise WireError(f"VERIFY says {nbad} mismatches, body has {len(b)} bytes")
    bad = tuple(_BAD.unpack_from(b, _VERIFY.size + i * _BAD.size)[:4] for i in range(nbad))
    return Verify(vcpu, checked, phase, bad)


class Reader:
    """Bytes in -> decoded frames out. A malformed frame raises WireError; the connection is then closed."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            magic, ver, t, n = HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                raise WireError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
            if ver != VERSION:
                raise WireError(f"agent protocol version {ver}; this daemon speaks {VERSION}")
            if n > MAX_BODY:
                raise WireError(f"frame body of {n} bytes exceeds {MAX_BODY}")
            if len(self._buf) < HEADER.size + n:
                break
            body = bytes(self._buf[HEADER.size:HEADER.size + n])
            del self._buf[:HEADER.size + n]
            out.append(decode_body(t, body))
        return out
