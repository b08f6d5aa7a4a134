"""The peer session's wire codec: events <-> Cap'n Proto frames (protocol/schemas/peer.capnp). Readers and
builders never leave this module; VcpuChunk's hot path is chunkwire.py."""
from __future__ import annotations

from ..errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ..framing import Limits
from .chunkwire import _chunk_parts, _fast_chunk
from .events import (Abort, Answer, Capabilities, Commit, Event, Hello, Inquiry, PlanAccept, PlanProposal,
                     Preflight, StreamEnd, VcpuChunk, _received)


# --- the wire codec (Cap'n Proto readers/builders never leave this section) ------------------------------------
_WIRE_NAMES = {Hello: "hello", Capabilities: "capabilities", PlanProposal: "planProposal", PlanAccept: "planAccept",
               Preflight: "preflight", VcpuChunk: "vcpuChunk", StreamEnd: "streamEnd", Commit: "commit",
               Abort: "abort", Inquiry: "inquiry", Answer: "answer"}


def _schema():
    from ..schemas import load_capnp      # lazy: the state machine and events do not need Cap'n Proto
    return load_capnp("peer.capnp")


def encode(event: Event) -> bytes:
    if type(event) is VcpuChunk:
        if event.wire:
            return event.wire
        data = b"".join(_chunk_parts(event))
        object.__setattr__(event, "wire", data)      # chunks may be encoded ahead of the stream (source side)
        return data
    return _encode(event)


def encode_parts(event: Event) -> tuple:
    """encode(event) as pieces to write back to back (a VcpuChunk's values are not copied: a writer joins the
    pieces of several events into one write)."""
    if type(event) is VcpuChunk:
        return (event.wire,) if event.wire else _chunk_parts(event)
    return (_encode(event),)


def _encode(event: Event) -> bytes:
    msg = _schema().Message.new_message()
    name = _WIRE_NAMES[type(event)]
    m = msg.init(name)
    if isinstance(event, Hello):
        m.versions = list(event.versions)
        m.role = event.role
        m.node = event.node
    elif isinstance(event, Capabilities):
        m.format, m.doc = event.format, event.doc
    elif isinstance(event, PlanProposal):
        m.migrationId, m.vmId, m.vcpus, m.format = event.migration_id, event.vm_id, event.vcpus, event.format
        m.plan, m.digest, m.vmProfile = event.plan, event.digest, event.vm_profile
    elif isinstance(event, (PlanAccept, Commit)):
        m.migrationId, m.digest = event.migration_id, event.digest
    elif isinstance(event, Preflight):
        m.ok, m.detail, m.events = event.ok, event.detail, list(event.events)
    elif isinstance(event, VcpuChunk):
        m.vmId, m.vcpu, m.chunk = event.vm_id, event.vcpu, event.chunk
        m.regIdsLe = event.ids_le
        m.values, m.checksumKind, m.checksum = event.values, event.checksum_kind, event.checksum
        if event.count:
            m.vcpuCount = event.count
    elif isinstance(event, StreamEnd):
        m.vmId, m.vcpus, m.chunks, m.digest = event.vm_id, event.vcpus, event.chunks, event.digest
    elif isinstance(event, Abort):
        m.reason, m.code = event.reason, event.code
    elif isinstance(event, Inquiry):
        m.migrationId, m.vmId = event.migration_id, event.vm_id
    elif isinstance(event, Answer):
        m.migrationId, m.vmId, m.outcome, m.phase, m.vmState = (event.migration_id, event.vm_id, event.outcome,
                                                                event.phase, event.vm_state)
    return msg.to_bytes()


def _decode_reader(r) -> Event:
    w = r.which()
    m = getattr(r, w)
    if w == "hello":
        return Hello(tuple(m.versions), str(m.role), m.node)
    if w == "capabilities":
        return Capabilities(m.format, bytes(m.doc))
    if w == "planProposal":
        return PlanProposal(m.migrationId, m.vmId, m.vcpus, m.format, bytes(m.plan), bytes(m.digest),
                            bytes(m.vmProfile))
    if w == "planAccept":
        return PlanAccept(m.migrationId, bytes(m.digest))
    if w == "preflight":
        return Preflight(m.ok, m.detail, tuple(m.events))
    if w == "vcpuChunk":
        return VcpuChunk(m.vmId, m.vcpu, m.chunk, tuple(m.regIds) if m._has("regIds") else (), m.values,
                         str(m.checksumKind), _received(m.checksum), m.regIdsLe, m.vcpuCount)
    if w == "streamEnd":
        return StreamEnd(m.vmId, m.vcpus, m.chunks, bytes(m.digest))
    if w == "commit":
        return Commit(m.migrationId, bytes(m.digest))
    if w == "abort":
        return Abort(m.reason, m.code)
    if w == "inquiry":
        return Inquiry(m.migrationId, m.vmId)
    if w == "answer":
        return Answer(m.migrationId, m.vmId, m.outcome, m.phase, m.vmState)
    raise LocalProtocolError(f"unknown message kind {w!r}", "unknown-message")


def decode(frame: bytes | memoryview, limits: Limits = Limits()) -> Event:
    """One frame -> one event. Anything wrong -> RemoteProtocolError naming it."""
    try:
        ev = _fast_chunk(frame, limits)
        if ev is not None:
            return ev
    except LocalProtocolError as e:
        raise RemoteProtocolError(str(e), e.what) from e
    schema = _schema()
    if type(frame) is not bytes:
        frame = bytes(frame)
    try:
        with schema.Message.from_bytes(frame, traversal_limit_in_words=limits.traversal_limit_in_words,
                                       nesting_limit=limits.nesting_limit) as r:
            if r.which() == "vcpuChunk":
                c = r.vcpuChunk
                n = max(len(c.regIds), len(c.regIdsLe) // 8)
                if n > limits.max_registers_per_chunk:
                    raise LocalProtocolError(f"VcpuChunk carries {n} registers; the limit is "
                                             f"{limits.max_registers_per_chunk}", "chunk-too-large")
            return _decode_reader(r)
    except LocalProtocolError as e:
        raise RemoteProtocolError(str(e), e.what) from e
    except ProtocolError:
        raise
    except UnicodeDecodeError as e:
        raise RemoteProtocolError(f"message text is not UTF-8: {e.reason}", "malformed-message") from None
    except Exception as e:    # capnp.KjException and anything the decoder raises on hostile input
        desc = getattr(e, "description", None) or str(e) or type(e).__name__
        raise RemoteProtocolError(f"undecodable Cap'n Proto message: {desc.splitlines()[0][:300]}",
                                  "malformed-message") from None
