"""protocol/session/ + framing.py: the sans-IO peer session."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from invariantd.protocol import session as ps
from invariantd.protocol.errors import LocalProtocolError, RemoteProtocolError
from invariantd.protocol.framing import FrameDecoder, Limits
from invariantd.protocol.session import (NEED_DATA, Abort, Capabilities, Commit, ConnectionClosed, Hello,
                                         PlanAccept, PlanProposal, Preflight, Session, StreamEnd, VcpuChunk)

X0 = 0x6030000000100000
V0 = 0x6040000000100054
MIDR = 0x603000000013c000


class SessionPair:
    """Source and destination sessions back to back: whatever one sends, the other must receive unchanged."""

    def __init__(self, limits: Limits = Limits()):
        self.s = {ps.SOURCE: Session(ps.SOURCE, limits), ps.DESTINATION: Session(ps.DESTINATION, limits)}

    def send(self, role, event, split: int | None = None):
        data = self.s[role].send(event)
        other = self.s[ps.DESTINATION if role == ps.SOURCE else ps.SOURCE]
        pieces = [data] if not split else [data[i:i + split] for i in range(0, len(data), split)]
        got = []
        for p in pieces:
            other.receive_data(p)
            while (ev := other.next_event()) is not NEED_DATA:
                got.append(ev)
        assert got == [event]
        return data


def chunks(vm="vm-1"):
    return [VcpuChunk.build(vm, 0, 0, [(X0, 1), (MIDR, 0x410FD083)]),
            VcpuChunk.build(vm, 0, 1, [(V0, 1 << 127)], "sha256"),
            VcpuChunk.build(vm, 1, 0, [(X0, 2)])]


def run_to(pair: SessionPair, upto: str = "done", split=None):
    S, D = ps.SOURCE, ps.DESTINATION
    pair.send(S, Hello((1,), S, "a"), split)
    pair.send(D, Hello((1, 2), D, "b"), split)
    pair.send(D, Capabilities("invariantd/host-capabilities@1", b'{"x":1}'), split)
    prop = PlanProposal("m-1", "vm-1", 2, "invariantd/apply-policy@1", b"{}")
    pair.send(S, prop, split)
    pair.send(D, PlanAccept("m-1", prop.digest), split)
    pair.send(D, Preflight(True, "ok", ("MIDR_EL1 override",)), split)
    if upto == "ready":
        return
    for c in chunks():
        pair.send(S, c, split)
    if upto == "streaming":
        return
    end = pair.s[S].stream_end()
    pair.send(S, end, split)
    pair.send(D, Commit("m-1", end.digest), split)
    pair.send(S, Commit("m-1", end.digest), split)


@pytest.mark.parametrize("split", [None, 1, 7])
def test_full_conversation(split):
    pair = SessionPair()
    run_to(pair, split=split)
    for s in pair.s.values():
        assert s.state is ps.DONE and s.version == 1 and s.stream_digest is not None
    assert pair.s[ps.SOURCE].bytes_sent == pair.s[ps.DESTINATION].bytes_received


def test_chunk_registers_roundtrip():
    c = chunks()[1]
    assert c.registers() == [(V0, 1 << 127)] and len(c.checksum) == 32
    assert len(chunks()[0].checksum) == 4


def test_eof_at_boundary_and_inside_frame():
    s = Session(ps.DESTINATION)
    s.receive_data(b"")
    assert isinstance(s.next_event(), ConnectionClosed)
    s = Session(ps.DESTINATION)
    s.receive_data(Session(ps.SOURCE).send(Hello((1,), ps.SOURCE))[:10])
    assert s.next_event() is NEED_DATA
    s.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        s.next_event()


def test_out_of_order_is_remote_error_and_sticky():
    d = Session(ps.DESTINATION)
    d.receive_data(Session(ps.SOURCE).send(Hello((1,), ps.SOURCE)))
    d.next_event()
    other = Session(ps.SOURCE)
    other.state = ps.READY
    other.proposal = PlanProposal("m", "vm-1", 1, "f", b"")
    d.receive_data(other.send(VcpuChunk.build("vm-1", 0, 0, [(X0, 1)])))
    with pytest.raises(RemoteProtocolError, match="not allowed in state GREETING") as ei:
        d.next_event()
    assert ei.value.what == "unexpected-message" and d.state is ps.ERROR
    with pytest.raises(RemoteProtocolError, match="ERROR state"):
        d.next_event()
    with pytest.raises(LocalProtocolError):
        d.send(Abort("x"))


def test_local_misuse_is_local_error():
    s = Session(ps.SOURCE)
    with pytest.raises(LocalProtocolError, match="claims role"):
        s.send(Hello((1,), ps.DESTINATION))
    assert s.state is ps.ERROR


def test_version_mismatch():
    pair = SessionPair()
    pair.send(ps.SOURCE, Hello((1,), ps.SOURCE))
    data = pair.s[ps.DESTINATION].send(Hello((1,), ps.DESTINATION))
    s = Session(ps.SOURCE, versions=(2,))
    s.send(Hello((2,), ps.SOURCE))
    s.receive_data(data)
    with pytest.raises(RemoteProtocolError, match="no common protocol version"):
        s.next_event()


def test_plan_digest_mismatch():
    pair = SessionPair()
    run_to(pair, "ready")
    pair2 = SessionPair()
    S, D = ps.SOURCE, ps.DESTINATION
    pair2.send(S, Hello((1,), S))
    pair2.send(D, Hello((1,), D))
    pair2.send(D, Capabilities("f", b""))
    pair2.send(S, PlanProposal("m-1", "vm-1", 1, "f", b"plan A"))
    with pytest.raises(LocalProtocolError, match="did not compute the same plan"):
        pair2.s[D].send(PlanAccept("m-1", PlanProposal("m-1", "vm-1", 1, "f", b"plan B").digest))


def test_chunk_order_digest_and_checksum_checked():
    pair = SessionPair()
    run_to(pair, "ready")
    with pytest.raises(LocalProtocolError, match="expected 0"):
        pair.s[ps.SOURCE].send(VcpuChunk.build("vm-1", 0, 1, [(X0, 1)]))
    with pytest.raises(LocalProtocolError, match="checksum mismatch"):
        VcpuChunk("vm-1", 0, 0, (X0,), b"\0" * 8, "crc32", b"\0\0\0\0")
    with pytest.raises(LocalProtocolError, match="value bytes"):
        VcpuChunk("vm-1", 0, 0, (X0,), b"\0" * 7)


def test_tampered_stream_end_refused_by_receiver():
    pair = SessionPair()
    run_to(pair, "streaming")
    src, dst = pair.s[ps.SOURCE], pair.s[ps.DESTINATION]
    bad = StreamEnd("vm-1", 2, 3, b"\1" * 32)
    src.state = ps.STREAMING
    src._digest = __import__("hashlib").sha256(b"whatever")      # a source that lies about its digest
    src._process = lambda sender, ev: None
    dst.receive_data(src.send(bad))
    with pytest.raises(RemoteProtocolError, match="digest does not match") as ei:
        dst.next_event()
    assert ei.value.what == "stream-digest-mismatch"


def test_abort_from_either_side_and_crossing_messages():
    pair = SessionPair()
    run_to(pair, "ready")
    S, D = ps.SOURCE, ps.DESTINATION
    late = pair.s[S].send(VcpuChunk.build("vm-1", 0, 0, [(X0, 1)]))   # in flight while D aborts
    abort = pair.s[D].send(Abort("apply failed: MIDR_EL1", "apply"))
    pair.s[D].receive_data(late)
    assert isinstance(pair.s[D].next_event(), VcpuChunk) and pair.s[D].state is ps.ABORTED
    pair.s[S].receive_data(abort)
    ev = pair.s[S].next_event()
    assert ev == Abort("apply failed: MIDR_EL1", "apply") and pair.s[S].state is ps.ABORTED
    assert pair.s[S].aborted_by == D
    with pytest.raises(LocalProtocolError, match="aborted"):
        pair.s[S].send(VcpuChunk.build("vm-1", 0, 1, [(X0, 1)]))


# --- framing limits -----------------------------------------------------------------------------------
def test_too_many_segments_named():
    d = FrameDecoder(Limits(max_segments=4))
    d.feed(struct.pack("<I", 9))
    with pytest.raises(RemoteProtocolError, match="10 segments; the limit is 4") as ei:
        d.next_frame()
    assert ei.value.what == "too-many-segments"


def test_oversized_frame_refused_from_header_alone():
    s = Session(ps.DESTINATION, Limits(max_frame_bytes=1024))
    s.receive_data(struct.pack("<II", 0, 1 << 20))            # 8 MiB segment announced, no body sent
    with pytest.raises(RemoteProtocolError, match="the limit is 1024") as ei:
        s.next_event()
    assert ei.value.what == "frame-too-large"


def test_oversized_send_refused_locally():
    s = Session(ps.SOURCE, Limits(max_frame_bytes=256))
    with pytest.raises(LocalProtocolError, match="send smaller chunks"):
        s.send(Hello((1,), ps.SOURCE, "n" * 250))


def test_traversal_limit():
    s = Session(ps.DESTINATION, Limits(traversal_limit_in_words=64))
    s.receive_data(ps.encode(Capabilities("f", b"x" * 4000)))
    with pytest.raises(RemoteProtocolError, match="traversal limit|undecodable"):
        s.next_event()


def test_garbage_pointer_is_named():
    s = Session(ps.DESTINATION)
    s.receive_data(struct.pack("<II", 0, 2) + b"\xff" * 16)
    with pytest.raises(RemoteProtocolError, match="undecodable Cap'n Proto message"):
        s.next_event()


def test_too_many_registers_per_chunk():
    lim = Limits(max_registers_per_chunk=2)
    src = Session(ps.SOURCE)
    data = src.send(Hello((1,), ps.SOURCE))
    pair = SessionPair()
    run_to(pair, "ready")
    frame = pair.s[ps.SOURCE].send(VcpuChunk.build("vm-1", 0, 0, [(X0, 1)] * 3))
    d = Session(ps.DESTINATION, lim)
    d.receive_data(frame)
    with pytest.raises(RemoteProtocolError, match="limit is 2"):
        d.next_event()
    assert data


# --- the decoder invariant (h11 fuzz): any bytes give events or RemoteProtocolError, nothing else -------------
def _valid_frames() -> list[bytes]:
    pair = SessionPair()
    out = []
    orig = pair.send

    def rec(role, ev, split=None):
        out.append(orig(role, ev, split))
    pair.send = rec
    run_to(pair)
    return out


VALID = _valid_frames()


def _feed_all(role, data: bytes, pieces: int, reserve: int = 0):
    s = Session(role, Limits(max_frame_bytes=1 << 16, traversal_limit_in_words=1 << 14))
    s.reserve(reserve)                  # frames then go straight into reserved memory as they arrive
    step = max(1, len(data) // max(1, pieces))
    events = []
    try:
        for i in range(0, len(data), step):
            s.receive_data(data[i:i + step])
            while (ev := s.next_event()) is not NEED_DATA:
                events.append(ev)
        s.receive_data(b"")
        events.append(s.next_event())
    except RemoteProtocolError:
        assert s.state is ps.ERROR
        return "error"
    for ev in events:
        assert isinstance(ev, (Hello, Capabilities, PlanProposal, PlanAccept, Preflight, VcpuChunk, StreamEnd,
                               Commit, Abort, ConnectionClosed))
    return events


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512), st.integers(1, 8), st.sampled_from([ps.SOURCE, ps.DESTINATION]),
       st.sampled_from([0, 64, 4096]))
def test_any_bytes_give_events_or_remote_error(data, pieces, role, reserve):
    _feed_all(role, data, pieces, reserve)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(VALID) - 1), st.data())
def test_mutated_valid_frames_give_events_or_remote_error(i, data):
    frame = bytearray(b"".join(VALID[: i + 1]))
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    pieces = data.draw(st.integers(1, 5))
    plain = _feed_all(ps.DESTINATION, bytes(frame), pieces)
    # the same outcome when frames are copied into reserved memory as they arrive (too small or ample)
    assert _feed_all(ps.DESTINATION, bytes(frame), pieces, data.draw(st.sampled_from([300, 1 << 16]))) == plain


def _to_streamed(pair, versions):
    """Both sides agree on max(versions) and stream up to StreamEnd; -> the StreamEnd."""
    S, D = ps.SOURCE, ps.DESTINATION
    pair.send(S, Hello(versions, S, "a"))
    pair.send(D, Hello(versions, D, "b"))
    pair.send(D, Capabilities("invariantd/host-capabilities@1", b'{"x":1}'))
    prop = PlanProposal("m-1", "vm-1", 2, "invariantd/apply-policy@1", b"{}")
    pair.send(S, prop)
    pair.send(D, PlanAccept("m-1", prop.digest))
    pair.send(D, Preflight(True, "ok", ()))
    for c in chunks():
        pair.send(S, c)
    end = pair.s[S].stream_end()
    pair.send(S, end)
    return end


def test_protocol_4_destination_acknowledges_the_source_commit():
    S, D = ps.SOURCE, ps.DESTINATION
    pair = SessionPair()
    end = _to_streamed(pair, (1, 2, 3, 4))
    pair.send(D, Commit("m-1", end.digest))
    pair.send(S, Commit("m-1", end.digest))
    assert {s.state for s in pair.s.values()} == {ps.RELEASED}        # released, not yet acknowledged
    pair.send(D, Commit("m-1", end.digest))
    assert {s.state for s in pair.s.values()} == {ps.DONE}


def test_protocol_4_no_abort_once_released():
    S, D = ps.SOURCE, ps.DESTINATION
    pair = SessionPair()
    end = _to_streamed(pair, (4,))
    pair.send(D, Commit("m-1", end.digest))
    pair.send(S, Commit("m-1", end.digest))
    with pytest.raises(LocalProtocolError, match="Abort from source in state RELEASED"):
        pair.s[S].send(Abort("changed my mind", "source"))    # too late: the VM has left the source


def test_protocol_3_peers_end_at_the_source_commit():
    S, D = ps.SOURCE, ps.DESTINATION
    pair = SessionPair()
    end = _to_streamed(pair, (1, 2, 3))
    pair.send(D, Commit("m-1", end.digest))
    pair.send(S, Commit("m-1", end.digest))
    assert {s.state for s in pair.s.values()} == {ps.DONE} and pair.s[S].version == 3


def test_an_acknowledgement_for_another_stream_is_refused():
    S, D = ps.SOURCE, ps.DESTINATION
    pair = SessionPair()
    end = _to_streamed(pair, (4,))
    pair.send(D, Commit("m-1", end.digest))
    pair.send(S, Commit("m-1", end.digest))
    with pytest.raises(LocalProtocolError, match="Commit digest differs"):
        pair.s[D].send(Commit("m-1", bytes(32)))


def test_a_large_frame_before_the_plan_is_refused_from_its_header():
    """Until the plan is agreed a peer may make the daemon buffer at most Limits.max_preplan_frame_bytes."""
    d = Session(ps.DESTINATION)
    header = struct.pack("<II", 0, (1 << 20) // 8)              # one segment of 1 MiB: fine after the plan
    d.receive_data(header)
    with pytest.raises(RemoteProtocolError, match="limit is 262144 until the plan is agreed"):
        d.next_event()
