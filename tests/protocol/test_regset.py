"""protocol/regset.py: a vCPU's register state as one type - ids and KVM's own bytes - validated once."""
from __future__ import annotations

import pytest

from invariantd.protocol import regid
from invariantd.protocol.errors import LocalProtocolError
from invariantd.protocol.regset import RegisterSet

X0 = 0x6030000000100000                   # core, U64
V0 = 0x6040000000100054                   # core, U128
CCSIDR0 = regid.demux_ccsidr(0)           # U32
Z0 = regid.sve_z(0)                       # U2048


def test_bytes_are_kvms_layout_and_pairs_read_back():
    rs = RegisterSet.from_pairs([(X0, 0x1122), (CCSIDR0, 0x700FE01A), (V0, 1 << 127), (Z0, 3)])
    assert len(rs.data) == 8 + 4 + 16 + 256
    assert rs.data[:8] == (0x1122).to_bytes(8, "little") and rs.data[8:12] == (0x700FE01A).to_bytes(4, "little")
    assert list(rs) == [(X0, 0x1122), (CCSIDR0, 0x700FE01A), (V0, 1 << 127), (Z0, 3)]
    again = RegisterSet.from_bytes(rs.ids_le, rs.data)
    assert again == rs and again.as_dict()[V0] == 1 << 127 and rs[2] == (V0, 1 << 127)


def test_validated_once_and_typed():
    with pytest.raises(LocalProtocolError, match="does not fit"):
        RegisterSet.from_pairs([(CCSIDR0, 1 << 32)])
    with pytest.raises(LocalProtocolError, match="value bytes for registers needing"):
        RegisterSet.from_bytes([X0], b"\0" * 7)
    with pytest.raises(LocalProtocolError, match="not a list of u64"):
        RegisterSet.from_bytes(b"\0" * 9, b"")
    with pytest.raises(LocalProtocolError, match="size code"):
        RegisterSet.from_bytes([X0 | (0xF << 52)], b"")


def test_replace_slice_concat_keep_the_bytes():
    rs = RegisterSet.from_pairs([(X0, 1), (CCSIDR0, 2), (V0, 3)])
    assert rs.replace({CCSIDR0: 9}).as_dict() == {X0: 1, CCSIDR0: 9, V0: 3} and rs.replace({}) is rs
    a, b = rs.slice(0, 2), rs.slice(2, 3)
    assert list(a) == [(X0, 1), (CCSIDR0, 2)] and list(b) == [(V0, 3)]
    assert RegisterSet.concat([a, b]) == rs and rs == [(X0, 1), (CCSIDR0, 2), (V0, 3)]
    assert rs != RegisterSet.from_pairs([(X0, 1), (CCSIDR0, 2), (V0, 4)])


def test_pick_keeps_order_and_bytes():
    rs = RegisterSet.from_pairs([(X0, 1), (CCSIDR0, 2), (V0, 3), (Z0, 4)])
    got = rs.pick([3, 0])
    assert list(got) == [(Z0, 4), (X0, 1)] and got.data == rs.data[28:] + rs.data[:8]
