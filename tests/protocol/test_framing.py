"""FrameDecoder: pieces in any split give the same frames; early refusals; reserved (pre-touched) memory."""
from __future__ import annotations

import random
import struct

import pytest

from invariantd.protocol import session as ps
from invariantd.protocol.errors import RemoteProtocolError
from invariantd.protocol.framing import FrameDecoder, Limits


def _frames():
    c = ps.VcpuChunk.build_multi("vm", 0, 0, [0x6030000000100000, 0x6040000000100054],
                                 [[i, i << 100] for i in range(50)])
    return [ps.encode(ps.Hello((1, 2), "source", "n")), ps.encode(c), ps.encode(ps.Abort("why", "x")), ps.encode(c)]


def _split(data: bytes, rnd: random.Random, most: int):
    out, i = [], 0
    while i < len(data):
        k = rnd.randint(1, most)
        out.append(data[i:i + k])
        i += k
    return out


@pytest.mark.parametrize("reserve", [0, 300, 1 << 20])
@pytest.mark.parametrize("most", [1, 7, 100, 5000])
def test_any_split_gives_the_same_frames(reserve, most):
    frames = _frames()
    rnd = random.Random(most * 7 + reserve)
    d = FrameDecoder()
    d.reserve(reserve)
    got = []
    for piece in _split(b"".join(frames), rnd, most):
        d.feed(piece)
        while (f := d.next_frame()) is not None:
            got.append(f)
    assert [bytes(f) for f in got] == frames and d.pending == 0
    for f in got:
        assert isinstance(f, bytes) or (isinstance(f, memoryview) and f.readonly)
    if reserve >= 1 << 20:
        assert all(isinstance(f, memoryview) for f in got)       # copied into the reserved memory
    assert [ps.decode(f) for f in got] == [ps.decode(f) for f in frames]


def test_reserved_chunk_values_are_views_and_the_stream_verifies():
    s, d = ps.Session(ps.SOURCE), ps.Session(ps.DESTINATION)

    def xfer(a, b, ev):
        b.receive_data(a.send(ev))
        assert b.next_event() == ev
    xfer(s, d, ps.Hello((1, 2), "source"))
    xfer(d, s, ps.Hello((1, 2), "destination"))
    xfer(d, s, ps.Capabilities("x", b""))
    prop = ps.PlanProposal("m", "vm", 8, "f", b"p")
    xfer(s, d, prop)
    xfer(d, s, ps.PlanAccept("m", prop.digest))
    xfer(d, s, ps.Preflight(True))
    d.reserve(1 << 16)
    chunks = [ps.VcpuChunk.build_multi("vm", i, 0, [0x6030000000100000], [[i], [i + 1]]) for i in range(0, 8, 2)]
    wire = b"".join(s.send(c) for c in chunks) + s.send(s.stream_end())
    got = []
    for k in range(0, len(wire), 13):
        d.receive_data(wire[k:k + 13])
        while (ev := d.next_event()) is not ps.NEED_DATA:
            got.append(ev)
    assert got[:-1] == chunks and isinstance(got[-1], ps.StreamEnd) and d.stream_digest == got[-1].digest
    assert all(isinstance(c.values, memoryview) and c.values.readonly for c in got[:-1])
    assert [c.per_vcpu() for c in got[:-1]] == [c.per_vcpu() for c in chunks]


def test_refusals_come_from_the_header_alone():
    d = FrameDecoder(Limits(max_segments=4))
    d.feed(struct.pack("<I", 9))
    with pytest.raises(RemoteProtocolError, match="10 segments") as ei:
        d.next_frame()
    assert ei.value.what == "too-many-segments"
    d = FrameDecoder(Limits(max_frame_bytes=1024))
    d.feed(struct.pack("<II", 0, 1000))          # 8000-byte segment declared; no body sent
    with pytest.raises(RemoteProtocolError, match="the limit is 1024") as ei:
        d.next_frame()
    assert ei.value.what == "frame-too-large"
    d = FrameDecoder()
    d.feed(struct.pack("<IIII", 1, 1, 1, 7) + b"\0" * 16)   # two segments, padding word not zero
    with pytest.raises(RemoteProtocolError, match="padding is not zero"):
        d.next_frame()


def test_caller_buffers_are_copied_on_feed():
    frame = _frames()[0]
    buf = bytearray(frame)
    d = FrameDecoder()
    d.feed(buf)
    buf[:] = b"\xff" * len(buf)
    assert d.next_frame() == frame


def test_feed_tells_when_a_frame_can_be_whole():
    frame = _frames()[1]
    d = FrameDecoder()
    assert d.feed(frame[:3]) is False                      # not even the segment count
    assert d.feed(frame[3:8]) is True                      # the header can be read now
    assert d.next_frame() is None
    assert d.feed(frame[8:-1]) is False                    # the frame's size is known: one byte short
    assert d.feed(frame[-1:]) is True and d.next_frame() == frame


def test_reserved_frame_is_filled_piece_by_piece():
    """With a reservation, a frame whose header arrived is copied into the reserved memory as its pieces come:
    no piece is held until the frame is whole; a piece spanning two frames leaves the next frame's bytes."""
    f1, f2 = _frames()[1], _frames()[3]
    d = FrameDecoder()
    d.reserve(1 << 20)
    d.feed(f1[:100])
    assert d.next_frame() is None and d._parts == [] and d._fill == 100
    d.feed(f1[100:200])
    assert d._parts == [] and d._fill == 200
    d.feed(f1[200:] + f2[:50])                              # the rest of f1 and the start of f2
    assert d._parts == [f2[:50]] and d.pending == len(f1) - 200 + 250
    got = d.next_frame()
    assert isinstance(got, memoryview) and got.readonly and bytes(got) == f1
    d.feed(f2[50:])
    assert bytes(d.next_frame()) == f2 and d.pending == 0
    d.feed(f1[:100])                                        # reservation dropped mid-frame: nothing is lost
    assert d.next_frame() is None and d._fill == 100
    d.reserve(0)
    d.feed(f1[100:])
    assert d.next_frame() == f1
