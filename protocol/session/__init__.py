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

The package, one module per part (h11's split of a protocol core):
    events.py     the messages (validated on construction), checksums, chunk layouts, the session's states
    wire.py       events <-> Cap'n Proto frames (peer.capnp)
    chunkwire.py  VcpuChunk's frame written and read by hand: the stream's hot path (named in peer.capnp)
    machine.py    Session: the conversation's rules
Errors are protocol/errors.py, frame boundaries protocol/framing.py.
"""
from ..framing import Limits
from .chunkwire import _chunk_parts, _fast_chunk
from .events import (ABORTED, AGREED, ANSWER_OUTCOMES, CAPS_KNOWN, CHECKSUM_SINCE, CHECKSUMS, COMMITTING, DESTINATION,
                     DONE, ERROR, GREETED, GREETING, INQUIRED, NEED_DATA, PROPOSED, PROTOCOL_VERSIONS, READY, RELEASED,
                     SOURCE, START, STREAM_DIGEST_TAG_V2, STREAMED, STREAMING, Abort, Answer, Capabilities, Commit,
                     ConnectionClosed, Event, Hello, Inquiry, PlanAccept, PlanProposal, Preflight, StreamEnd, VcpuChunk,
                     chunk_bytes, register_size)
from .machine import ABORTABLE, ACKED_COMMIT_SINCE, INQUIRY_SINCE, Session
from .wire import _decode_reader, _encode, _schema, decode, encode, encode_parts

__all__ = ["ABORTABLE", "ABORTED", "ACKED_COMMIT_SINCE", "AGREED", "ANSWER_OUTCOMES", "Abort", "Answer", "CAPS_KNOWN",
           "CHECKSUMS", "CHECKSUM_SINCE", "COMMITTING", "Capabilities", "Commit", "ConnectionClosed", "DESTINATION",
           "DONE", "ERROR", "Event", "GREETED", "GREETING", "Hello", "INQUIRED", "INQUIRY_SINCE", "Inquiry", "Limits",
           "NEED_DATA", "PROPOSED", "PROTOCOL_VERSIONS", "PlanAccept", "PlanProposal", "Preflight", "READY", "RELEASED",
           "SOURCE", "START", "STREAMED", "STREAMING", "STREAM_DIGEST_TAG_V2", "Session", "StreamEnd", "VcpuChunk",
           "chunk_bytes", "decode", "encode", "encode_parts", "register_size",
           "_chunk_parts", "_decode_reader", "_encode", "_fast_chunk", "_schema"]
