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
