"""VcpuChunk's wire form written and read without the Cap'n Proto library (the stream's hot path).

A hand-written codec of one struct of protocol/schemas/peer.capnp: CARRIED names every VcpuChunk field it writes
and reads, and tests/protocol/test_session_chunks.py fails when peer.capnp's VcpuChunk has a field not in it."""
from __future__ import annotations

import struct

from ..errors import LocalProtocolError
from ..framing import Limits
from .events import _KIND_TAG, CHECKSUMS, VcpuChunk, _received


# --- VcpuChunk's wire form without the Cap'n Proto library (the stream's hot path) ------------------------------
# A chunk is ~99% one Data field (values). The library would copy it into a builder and out again on the way out,
# and out of the message on the way in, with per-field Python overhead; these two functions write and read that
# one message shape directly: a single-segment frame, Message (1 data word, 1 pointer; union tag 5 = vcpuChunk)
# -> VcpuChunk (2 data words, 5 pointers) -> vmId, regIdsLe, checksum, values. The bytes are standard Cap'n
# Proto: any reader decodes them (tests/protocol/test_session_chunks.py checks against the library, both ways). A frame
# of any other shape (several segments, far pointers, the older regIds list, other struct sizes, anything out of
# bounds or odd) goes to the library's reader, which decides as before.
# Every field of peer.capnp's VcpuChunk this codec writes and reads (regIds: written empty, a frame holding it goes
# to the library). A field added to VcpuChunk must be added here and to both functions, or the fast path would
# drop it silently: tests/protocol/test_session_chunks.py compares this with the schema (fields, struct size, union tag).
CARRIED = ("vmId", "vcpu", "chunk", "regIds", "values", "checksumKind", "checksum", "regIdsLe", "vcpuCount")
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
