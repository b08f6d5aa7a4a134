"""Peer protocol 2: multi-vCPU chunks, the chained StreamEnd digest, version negotiation with protocol-1 peers."""
from __future__ import annotations

import hashlib
import struct

import xxhash

import pytest

from invariantd.protocol import session as ps
from invariantd.protocol.errors import LocalProtocolError, RemoteProtocolError
from invariantd.protocol.session import (NEED_DATA, Capabilities, Commit, Hello, PlanAccept, PlanProposal, Preflight,
                                         Session, VcpuChunk)
from support.peers import pair_at_ready

X0 = 0x6030000000100000
V0 = 0x6040000000100054
MIDR = 0x603000000013c000
S, D = ps.SOURCE, ps.DESTINATION




def deliver(s, d, ev):
    d.receive_data(s.send(ev))
    out = []
    while (x := d.next_event()) is not NEED_DATA:
        out.append(x)
    return out


def multi(first=0, n=4, chunk=0, kind="crc32"):
    ids = [X0, V0, MIDR]
    return VcpuChunk.build_multi("vm", first, chunk, ids, [[i, i << 100, 0x410FD083] for i in range(first, first + n)],
                                 kind)


def test_both_new_speak_2_and_old_peer_gets_1():
    s, d = pair_at_ready()
    assert s.version == d.version == 2
    s, d = pair_at_ready(src_versions=(1,))
    assert s.version == d.version == 1
    s, d = pair_at_ready(dst_versions=(1,))
    assert s.version == d.version == 1


def test_peer_without_a_common_version_is_refused_clearly():
    d = Session(D, versions=(2,))
    d.receive_data(Session(S, versions=(1,)).send(Hello((1,), S, "old")))
    with pytest.raises(RemoteProtocolError, match=r"no common protocol version: peer speaks \[1\], we speak \[2\] "
                                                   r"\(upgrade the older daemon\)") as e:
        d.next_event()
    assert e.value.what == "version-mismatch" and d.state is ps.ERROR


def test_multi_vcpu_chunk_roundtrip_and_stream():
    s, d = pair_at_ready()
    c = multi()
    assert c.count == 4 and list(c.vcpus) == [0, 1, 2, 3]
    [got] = deliver(s, d, c)
    assert got == c
    per = got.per_vcpu()
    assert sorted(per) == [0, 1, 2, 3] and per[2] == [(X0, 2), (V0, 2 << 100), (MIDR, 0x410FD083)]
    end = s.stream_end()
    [e] = deliver(s, d, end)
    assert e == end and d.stream_digest == end.digest
    # the chain, recomputed independently: tag, then per chunk u32 vcpu, chunk, count, u8 kind, u8 len, checksum
    want = hashlib.sha256(ps.STREAM_DIGEST_TAG_V2 + struct.pack("<IIIBB", 0, 0, 4, 0, 4) + c.checksum).digest()
    assert end.digest == want
    deliver(d, s, Commit("m", end.digest))


def test_checksum_covers_the_vcpu_count():
    c = multi()
    assert c.covered() == ps.chunk_bytes(0, 0, c.reg_ids, c.values, count=4)
    with pytest.raises(LocalProtocolError, match="value bytes"):
        VcpuChunk("vm", 0, 0, c.reg_ids, c.values, "crc32", c.checksum, count=2)
    two = multi(n=2)
    with pytest.raises(LocalProtocolError, match="checksum mismatch"):        # same bytes, other count
        VcpuChunk("vm", 0, 0, two.reg_ids, two.values + two.values, "crc32", two.checksum, count=4)


def test_multi_vcpu_chunk_refused_in_a_protocol_1_session():
    s, d = pair_at_ready(src_versions=(1,))
    c = multi()
    with pytest.raises(LocalProtocolError, match="needs protocol 2"):
        s.send(c)
    # a peer that sends one anyway is refused on receipt
    d.receive_data(ps.encode(multi()))
    with pytest.raises(RemoteProtocolError, match="needs protocol 2"):
        d.next_event()


def test_multi_vcpu_chunk_order_and_range():
    s, d = pair_at_ready(vcpus=4)
    deliver(s, d, multi(0, 2))
    with pytest.raises(LocalProtocolError, match="vCPUs 2..4; the plan has 4"):
        s.send(multi(2, 3))
    s, d = pair_at_ready(vcpus=4)
    deliver(s, d, multi(0, 2))
    with pytest.raises(LocalProtocolError, match="vCPU 1: chunk 0 arrived, expected 1"):
        s.send(multi(1, 2))
    assert s.state is ps.ERROR                              # sticky
    s, d = pair_at_ready(vcpus=4)
    deliver(s, d, multi(0, 2))
    deliver(s, d, multi(2, 2))
    deliver(s, d, multi(0, 4, chunk=1))                    # chunk 1 of every vCPU
    assert d._next_chunk == {0: 2, 1: 2, 2: 2, 3: 2}


def test_protocol_1_digest_unchanged():
    """Protocol 1 peers keep sha256 over every chunk's checksummed bytes."""
    s, d = pair_at_ready(src_versions=(1,), vcpus=1)
    c = VcpuChunk.build("vm", 0, 0, [(X0, 1), (V0, 1 << 127)])
    deliver(s, d, c)
    end = s.stream_end()
    assert end.digest == hashlib.sha256(c.covered()).digest()
    deliver(s, d, end)


def test_chain_detects_a_reordered_stream():
    a, b = multi(0, 2), multi(2, 2)
    s1, d1 = pair_at_ready()
    deliver(s1, d1, a)
    deliver(s1, d1, b)
    s2, d2 = pair_at_ready()
    deliver(s2, d2, b)
    deliver(s2, d2, a)
    assert s1.stream_end().digest != s2.stream_end().digest


def test_encoding_is_cached_on_the_chunk():
    c = multi()
    w = ps.encode(c)
    assert c.wire is w and ps.encode(c) is w
    assert ps.decode(w) == c


# --- the peer: protocol 2 groups vCPUs sharing a register list -------------------------------------------------
def test_source_groups_vcpus_into_chunks():
    from invariantd.daemon.peer import _chunks, _regsets
    regs = {i: [(X0, i), (V0, i << 64)] for i in range(10)}
    regs[7] = [(X0, 7)]                                       # another register list: a chunk of its own
    v2 = list(_chunks("vm", regs, 4096, "crc32", 2, chunk_bytes=(8 + 8 + 8 + 16) * 3))
    assert [(c.vcpu, c.count) for c in v2] == [(0, 3), (3, 3), (6, 1), (7, 1), (8, 2)]
    assert _regsets(v2) == regs
    v1 = list(_chunks("vm", regs, 4096, "crc32", 1))
    assert [c.count for c in v1] == [0] * 10 and _regsets(v1) == regs
    big = list(_chunks("vm", {0: regs[0], 1: regs[1]}, 1, "crc32", 2))   # more registers than a chunk holds
    assert [(c.vcpu, c.chunk, c.count) for c in big] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


def test_protocol_3_speaks_xxh3_checksums():
    s, d = pair_at_ready(src_versions=(1, 2, 3), dst_versions=(1, 2, 3))
    assert s.version == d.version == 3
    c = multi(kind="xxh3")
    # independently: XXH3-64 of the covered bytes, canonical (big-endian) 8 bytes
    assert c.checksum == xxhash.xxh3_64(ps.chunk_bytes(0, 0, c.reg_ids, c.values, count=4)).digest()
    assert len(c.checksum) == 8
    [got] = deliver(s, d, c)
    assert got == c and got.checksum_kind == "xxh3"
    end = s.stream_end()
    want = hashlib.sha256(ps.STREAM_DIGEST_TAG_V2 + struct.pack("<IIIBB", 0, 0, 4, 2, 8) + c.checksum).digest()
    assert end.digest == want
    deliver(s, d, end)


def test_xxh3_chunk_refused_below_protocol_3():
    s, d = pair_at_ready(src_versions=(1, 2, 3), dst_versions=(1, 2))
    assert s.version == 2
    with pytest.raises(LocalProtocolError, match="xxh3 checksum needs protocol 3; this session speaks 2"):
        s.send(multi(kind="xxh3"))
    s, d = pair_at_ready(src_versions=(1, 2), dst_versions=(1, 2, 3))
    d.receive_data(ps.encode(multi(kind="xxh3")))           # a peer sending one anyway
    with pytest.raises(RemoteProtocolError, match="xxh3 checksum needs protocol 3") as e:
        d.next_event()
    assert e.value.what == "bad-checksum" and d.state is ps.ERROR


def test_corrupted_xxh3_chunk_fails_its_checksum():
    s, d = pair_at_ready(src_versions=(3,), dst_versions=(3,))
    wire = bytearray(ps.encode(multi(kind="xxh3")))
    wire[-20] ^= 1                                            # a value byte
    d.receive_data(bytes(wire))
    with pytest.raises(RemoteProtocolError, match="xxh3 checksum mismatch"):
        d.next_event()
