"""VcpuChunk wire forms: packed register ids (regIdsLe, what writers send) and the older List(UInt64) form."""
from __future__ import annotations

import struct

import pytest

from invariantd.protocol import regid
from invariantd.protocol import session as ps
from invariantd.protocol.errors import RemoteProtocolError

Z0, P0 = regid.sve_z(0), regid.sve_p(0)


def _regs():
    ids = [regid.sve_z(n) for n in range(3)] + [regid.sve_p(0), regid.sve_ffr(), regid.SVE_VLS]
    return [(r, (i + 1) << (8 * regid.size_bytes(r) - 9)) for i, r in enumerate(ids)]


def test_build_roundtrip_packed_ids():
    regs = _regs()
    c = ps.VcpuChunk.build("vm", 3, 0, regs)
    assert c.reg_ids == tuple(r for r, _ in regs) and c.ids_le == struct.pack(f"<{len(regs)}Q", *c.reg_ids)
    d = ps.decode(ps.encode(c))
    assert d == c and d.registers() == regs and d.checksum == c.checksum
    assert c.covered() == ps.chunk_bytes(3, 0, c.reg_ids, c.values)      # checksum input unchanged


def test_older_writer_list_form_accepted():
    c = ps.VcpuChunk.build("vm", 0, 0, _regs())
    msg = ps._schema().Message.new_message()
    m = msg.init("vcpuChunk")
    m.vmId, m.vcpu, m.chunk = c.vm_id, c.vcpu, c.chunk
    m.regIds = list(c.reg_ids)
    m.values, m.checksumKind, m.checksum = c.values, c.checksum_kind, c.checksum
    assert ps.decode(msg.to_bytes()) == c


def test_both_forms_must_agree_and_ids_must_be_u64s():
    c = ps.VcpuChunk.build("vm", 0, 0, _regs())
    msg = ps._schema().Message.new_message()
    m = msg.init("vcpuChunk")
    m.vmId, m.regIds, m.regIdsLe = "vm", list(c.reg_ids[:-1]) + [Z0], c.ids_le
    m.values, m.checksum = c.values, c.checksum
    with pytest.raises(RemoteProtocolError, match="regIds and regIdsLe differ"):
        ps.decode(msg.to_bytes())
    msg = ps._schema().Message.new_message()
    m = msg.init("vcpuChunk")
    m.vmId, m.regIdsLe, m.values, m.checksum = "vm", c.ids_le + b"\x01", c.values, c.checksum
    with pytest.raises(RemoteProtocolError, match="not a list of u64"):
        ps.decode(msg.to_bytes())


def test_packed_id_count_limited_before_decoding():
    msg = ps._schema().Message.new_message()
    m = msg.init("vcpuChunk")
    m.vmId, m.regIdsLe = "vm", struct.pack("<Q", Z0) * 5000
    with pytest.raises(RemoteProtocolError, match="5000 registers; the limit is 4096") as ei:
        ps.decode(msg.to_bytes())
    assert ei.value.what == "chunk-too-large"


def test_value_too_wide_for_register_refused():
    with pytest.raises(Exception, match="does not fit"):
        ps.VcpuChunk.build("vm", 0, 0, [(P0, 1 << 256)])


# --- the direct VcpuChunk codec (session._chunk_parts / _fast_chunk) against the Cap'n Proto library -----------
def _multi(kind="crc32", vm="vm"):
    return ps.VcpuChunk.build_multi(vm, 4, 2, [r for r, _ in _regs()], [[v for _, v in _regs()]] * 3, kind)


@pytest.mark.parametrize("kind", ["crc32", "sha256", "xxh3"])
def test_direct_encoding_is_what_the_library_reads(kind):
    c = _multi(kind)
    with ps._schema().Message.from_bytes(ps.encode(c)) as r:
        assert ps._decode_reader(r) == c                     # any Cap'n Proto reader (a protocol-1 daemon too)
    lib = ps._encode(c)                                       # the library's writer (older daemons)
    assert ps._fast_chunk(lib, ps.Limits()) == c            # read directly, without the library
    assert ps.decode(lib) == ps.decode(ps.encode(c)) == c
    assert b"".join(ps.encode_parts(c)) == ps.encode(c)


def test_unusual_frames_go_to_the_library():
    c = _multi()
    w = bytearray(ps.encode(c))
    w[8 + 8 * 6:8 + 8 * 7] = struct.pack("<Q", 1)          # a non-null regIds pointer (older form): fallback
    assert ps._fast_chunk(bytes(w), ps.Limits()) is None
    v = ps.VcpuChunk.build("vm\u00fc", 0, 0, _regs())      # non-ASCII VM name: the library decodes it
    assert ps._fast_chunk(ps.encode(v), ps.Limits()) is None and ps.decode(ps.encode(v)) == v


def test_hostile_pointers_are_refused_clearly():
    c = _multi()
    good = ps.encode(c)
    for word in (7, 8, 9):                                   # values, checksum, regIdsLe pointers
        for bad in (struct.pack("<Q", (1 << 35) * 10**6 | 2 << 32 | 1), struct.pack("<Q", 0xFFFFFFFC | 2 << 32)):
            w = bytearray(good)
            w[8 + 8 * word:16 + 8 * word] = bad              # out of the segment (forward / backward)
            with pytest.raises(RemoteProtocolError):
                ps.decode(bytes(w))
    w = bytearray(good)
    w[8 + 8 * 2:16 + 8 * 2] = struct.pack("<Q", 50 << 2 | 5 << 48 | 2 << 32)   # Message -> VcpuChunk beyond the end
    with pytest.raises(RemoteProtocolError):               # the library reads an empty struct: no checksum
        ps.decode(bytes(w))


def test_received_chunk_without_checksum_refused():
    c = _multi()
    msg = ps._schema().Message.new_message()
    m = msg.init("vcpuChunk")
    m.vmId, m.vcpu, m.chunk, m.regIdsLe, m.values, m.vcpuCount = c.vm_id, c.vcpu, c.chunk, c.ids_le, c.values, 3
    with pytest.raises(RemoteProtocolError, match="without a checksum") as ei:
        ps.decode(msg.to_bytes())
    assert ei.value.what == "bad-checksum"
    w = bytearray(ps.encode(c))                              # the direct reader: checksum pointer nulled
    w[8 + 8 * 8:16 + 8 * 8] = bytes(8)
    with pytest.raises(RemoteProtocolError, match="without a checksum"):
        ps.decode(bytes(w))


def test_corrupted_values_fail_the_checksum():
    c = _multi()
    w = bytearray(ps.encode(c))
    w[-20] ^= 1
    with pytest.raises(RemoteProtocolError, match="checksum mismatch") as ei:
        ps.decode(bytes(w))
    assert ei.value.what == "bad-checksum"


def test_the_fast_codec_carries_every_vcpuchunk_field_of_the_schema():
    """protocol/session/chunkwire.py writes and reads VcpuChunk by hand: a field peer.capnp gains that the codec
    does not carry would be dropped silently on the fast path. The schema itself is the reference."""
    from invariantd.protocol.session import chunkwire
    sch = ps._schema()
    vc = sch.VcpuChunk.schema
    assert sorted(vc.fieldnames) == sorted(chunkwire.CARRIED), set(vc.fieldnames) ^ set(chunkwire.CARRIED)
    node = vc.node.struct
    assert (node.dataWordCount, node.pointerCount) == (chunkwire._VC_DATA_WORDS, chunkwire._VC_PTRS)
    tag = next(f.discriminantValue for f in sch.Message.schema.node.struct.fields if f.name == "vcpuChunk")
    assert tag == chunkwire._MSG_VCPU_CHUNK
