"""The peer conversation as a state machine (sans-IO): which event may follow which, who may send it, and what
it must agree with (versions, plan digest, chunk numbering, stream digest). See the package docstring."""
from __future__ import annotations

import hashlib
from typing import Sequence


from ..errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ..framing import FrameDecoder, Limits
from .events import (ABORTED, AGREED, CAPS_KNOWN, CHECKSUM_SINCE, COMMITTING, DESTINATION, DONE, ERROR, GREETED,
                     GREETING, INQUIRED, NEED_DATA, PROPOSED, PROTOCOL_VERSIONS, READY, RELEASED, SOURCE, START,
                     STREAM_DIGEST_TAG_V2, STREAMED, STREAMING, Abort, Answer, Capabilities, Commit, ConnectionClosed,
                     Event, Hello, Inquiry, PlanAccept, PlanProposal, Preflight, StreamEnd, VcpuChunk, _chain_entry,
                     _need)
from .wire import _WIRE_NAMES, decode, encode_parts


# --- the state machine --------------------------------------------------------------------------------------------
S, D = SOURCE, DESTINATION
TRANSITIONS: dict[tuple[type, str, type], type] = {
    (START, S, Hello): GREETING,
    (GREETING, D, Hello): GREETED,
    (GREETED, D, Capabilities): CAPS_KNOWN,
    (CAPS_KNOWN, S, PlanProposal): PROPOSED,
    (PROPOSED, D, PlanAccept): AGREED,
    (AGREED, D, Preflight): READY,
    (READY, S, VcpuChunk): STREAMING,
    (STREAMING, S, VcpuChunk): STREAMING,
    (READY, S, StreamEnd): STREAMED,
    (STREAMING, S, StreamEnd): STREAMED,
    (STREAMED, D, Commit): COMMITTING,
    (COMMITTING, S, Commit): DONE,          # protocol 4: RELEASED (Session._process)
    (RELEASED, D, Commit): DONE,
    (CAPS_KNOWN, S, Inquiry): INQUIRED,
    (INQUIRED, D, Answer): DONE,
}
ACKED_COMMIT_SINCE = 4
INQUIRY_SINCE = 5
ABORTABLE = frozenset({START, GREETING, GREETED, CAPS_KNOWN, PROPOSED, AGREED, READY, STREAMING, STREAMED,
                       COMMITTING, INQUIRED})


class Session:
    def __init__(self, role: str, limits: Limits = Limits(), versions: Sequence[int] = PROTOCOL_VERSIONS) -> None:
        if role not in (SOURCE, DESTINATION):
            raise LocalProtocolError(f"role {role!r} is neither source nor destination")
        self.our_role = role
        self.their_role = DESTINATION if role == SOURCE else SOURCE
        self.limits = limits
        self.versions = tuple(versions)
        self.state: type = START
        self.version: int | None = None
        self.their_hello: Hello | None = None
        self.capabilities: Capabilities | None = None
        self.proposal: PlanProposal | None = None
        self.inquiry: Inquiry | None = None
        self.abort: Abort | None = None
        self.aborted_by: str | None = None
        self.error: ProtocolError | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self._decoder = FrameDecoder(limits)
        self._decoder.max_frame = min(limits.max_preplan_frame_bytes, limits.max_frame_bytes)
        self._eof = False
        self._digest_h = None               # protocol 1: every chunk's bytes; 2: the chain (see _chain_entry)
        self._chunks = 0
        self._next_chunk: dict[int, int] = {}
        self._stream_digest: bytes | None = None

    # --- public API
    def receive_data(self, data: bytes) -> bool:
        """Bytes from the peer (b"": end of stream). True when next_event() may have an event; False: it would
        say NEED_DATA (a caller may go on receiving without asking)."""
        if self._eof and data:
            raise LocalProtocolError("receive_data after end of stream")
        if not data:
            self._eof = True
            return True
        self.bytes_received += len(data)
        return self._decoder.feed(data)

    MAX_RESERVE = 256 << 20

    def reserve(self, nbytes: int) -> None:
        """Destination: about nbytes of chunks are about to arrive (the plan tells how many vCPUs and registers).
        Their frames are then copied into memory taken now (FrameDecoder.reserve, at most MAX_RESERVE), and
        received chunks' values are read-only views of it; released for new frames at StreamEnd."""
        self._decoder.reserve(min(max(0, nbytes), self.MAX_RESERVE))

    def next_event(self):
        if self.state is ERROR:
            raise RemoteProtocolError(f"session is in ERROR state ({self.error})", "error-state")
        try:
            frame = self._decoder.next_frame()
            if frame is None:
                if not self._eof:
                    return NEED_DATA
                if self._decoder.pending:
                    raise RemoteProtocolError(f"connection closed inside a frame ({self._decoder.pending} bytes "
                                              f"pending)", "truncated-frame")
                return ConnectionClosed()
            event = decode(frame, self.limits)
            self._process(self.their_role, event)
            return event
        except LocalProtocolError as e:
            self._fail(e)
            raise RemoteProtocolError(str(e), e.what) from e
        except RemoteProtocolError as e:
            self._fail(e)
            raise

    def send(self, event: Event) -> bytes:
        parts = self.send_parts(event)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def send_parts(self, event: Event) -> tuple:
        """send(), the bytes as pieces to write back to back (encode_parts): a writer coalescing several
        events joins all their pieces once."""
        if self.state is ERROR:
            raise LocalProtocolError(f"session is in ERROR state ({self.error})", "error-state")
        if type(event) not in _WIRE_NAMES:
            raise LocalProtocolError(f"cannot send {type(event).__name__}")
        try:
            parts = encode_parts(event)
            size = sum(map(len, parts))
            if size > self.limits.max_frame_bytes:
                raise LocalProtocolError(f"{type(event).__name__} encodes to {size} bytes; the frame limit is "
                                         f"{self.limits.max_frame_bytes} (send smaller chunks)", "frame-too-large")
            self._process(self.our_role, event)
        except LocalProtocolError as e:
            self._fail(e)
            raise
        self.bytes_sent += size
        return parts

    def send_failed(self) -> None:
        """The transport could not deliver what send() returned: the session cannot continue."""
        self._fail(LocalProtocolError("send failed", "send-failed"))

    def stream_end(self) -> StreamEnd:
        """The StreamEnd for everything sent so far (source side)."""
        if self.proposal is None:
            raise LocalProtocolError("no plan proposal yet")
        return StreamEnd(self.proposal.vm_id, self.proposal.vcpus, self._chunks, self._digest.digest())

    @property
    def stream_digest(self) -> bytes | None:
        """The whole-set digest once StreamEnd passed (either direction)."""
        return self._stream_digest

    # --- internals
    @property
    def _digest(self):
        if self._digest_h is None:
            self._digest_h = hashlib.sha256(STREAM_DIGEST_TAG_V2 if (self.version or 1) >= 2 else b"")
        return self._digest_h

    @_digest.setter
    def _digest(self, h) -> None:
        self._digest_h = h

    def _fail(self, e: ProtocolError) -> None:
        self.state = ERROR
        self.error = self.error or e

    def _process(self, sender: str, ev: Event) -> None:
        who = "we" if sender == self.our_role else "the peer"
        if isinstance(ev, Abort):
            if self.state in ABORTABLE:
                self.state, self.abort, self.aborted_by = ABORTED, ev, sender
                return
            if self.state is ABORTED:
                return
            raise LocalProtocolError(f"Abort from {sender} in state {self.state!r}", "unexpected-message")
        if self.state is ABORTED:
            if sender == self.our_role:
                raise LocalProtocolError(f"cannot send {type(ev).__name__}: the migration was aborted",
                                         "unexpected-message")
            return            # crossed the Abort on the wire: delivered, ignored by the state machine
        new = TRANSITIONS.get((self.state, sender, type(ev)))
        if new is None:
            raise LocalProtocolError(f"{type(ev).__name__} from {sender} ({who}) is not allowed in state "
                                     f"{self.state!r}", "unexpected-message")
        getattr(self, "_check_" + type(ev).__name__)(sender, ev)
        if new is DONE and self.state is COMMITTING and (self.version or 1) >= ACKED_COMMIT_SINCE:
            new = RELEASED                  # protocol 4: the destination acknowledges the source's Commit
        self.state = new
        if new is AGREED:                   # the plan is agreed: chunks may now use the full frame size
            self._decoder.max_frame = self.limits.max_frame_bytes

    def _check_Hello(self, sender: str, ev: Hello) -> None:
        _need(ev.role == sender, f"Hello claims role {ev.role!r} but comes from the {sender}", "wrong-role")
        if sender == self.our_role:
            # what our Hello advertises is what we speak (the source sends first, before it knows the peer)
            ours = set(ev.versions) & set(self.versions)
            _need(bool(ours), f"Hello offers versions {list(ev.versions)}; this session speaks "
                              f"{list(self.versions)}", "version-mismatch")
            self.versions = tuple(v for v in self.versions if v in ours)
        if sender == self.their_role:
            self.their_hello = ev
            common = set(ev.versions) & set(self.versions)
            _need(bool(common), f"no common protocol version: peer speaks {list(ev.versions)}, we speak "
                                f"{list(self.versions)} (upgrade the older daemon)", "version-mismatch")
            self.version = max(common)
        if sender == self.our_role and self.their_hello is not None:     # destination: it answers second
            common = set(self.their_hello.versions) & set(self.versions)
            _need(bool(common), f"no common protocol version: peer speaks {list(self.their_hello.versions)}, we "
                                f"speak {list(self.versions)}", "version-mismatch")
            self.version = max(common)

    def _check_Capabilities(self, sender: str, ev: Capabilities) -> None:
        self.capabilities = ev

    def _check_PlanProposal(self, sender: str, ev: PlanProposal) -> None:
        self.proposal = ev

    def _check_PlanAccept(self, sender: str, ev: PlanAccept) -> None:
        p = self.proposal
        _need(ev.migration_id == p.migration_id, f"PlanAccept for migration {ev.migration_id!r}, proposed "
                                                 f"{p.migration_id!r}", "wrong-migration")
        _need(ev.digest == p.digest, "PlanAccept digest differs from the proposed plan's: the two daemons did not "
                                     "compute the same plan", "plan-digest-mismatch")

    def _check_Preflight(self, sender: str, ev: Preflight) -> None:
        pass

    def _check_VcpuChunk(self, sender: str, ev: VcpuChunk) -> None:
        # once per chunk: messages are formatted only when a check fails
        p = self.proposal
        if ev.vm_id != p.vm_id:
            _need(False, f"VcpuChunk for VM {ev.vm_id!r}; the plan is for {p.vm_id!r}", "wrong-vm")
        if ev.vcpu >= p.vcpus:
            _need(False, f"VcpuChunk for vCPU {ev.vcpu}; the plan has {p.vcpus} vCPUs", "bad-chunk")
        if len(ev.reg_ids) > self.limits.max_registers_per_chunk:
            _need(False, f"VcpuChunk carries {len(ev.reg_ids)} registers; the limit is "
                         f"{self.limits.max_registers_per_chunk}", "chunk-too-large")
        if ev.count:
            _need(self.version is not None and self.version >= 2, f"VcpuChunk for {ev.count} vCPUs needs protocol "
                                                                  f"2; this session speaks {self.version}",
                  "bad-chunk")
            _need(ev.vcpu + ev.count <= p.vcpus, f"VcpuChunk for vCPUs {ev.vcpu}..{ev.vcpu + ev.count - 1}; the "
                                                 f"plan has {p.vcpus} vCPUs", "bad-chunk")
        since = CHECKSUM_SINCE[ev.checksum_kind]
        if since > (self.version or 1):
            _need(False, f"VcpuChunk with a {ev.checksum_kind} checksum needs protocol {since}; this session "
                         f"speaks {self.version}", "bad-checksum")
        nxt = self._next_chunk
        vcpus = ev.vcpus
        get = nxt.get
        for i in vcpus:
            if get(i, 0) != ev.chunk:
                _need(False, f"vCPU {i}: chunk {ev.chunk} arrived, expected {get(i, 0)}", "chunk-order")
        nxt.update(dict.fromkeys(vcpus, ev.chunk + 1))
        self._chunks += 1
        if self.version is not None and self.version >= 2:
            self._digest.update(_chain_entry(ev))
        else:
            for part in ev._parts():
                self._digest.update(part)

    def _check_StreamEnd(self, sender: str, ev: StreamEnd) -> None:
        p = self.proposal
        _need(ev.vm_id == p.vm_id and ev.vcpus == p.vcpus, f"StreamEnd for {ev.vm_id!r}/{ev.vcpus} vCPUs does not "
                                                           f"match the plan ({p.vm_id!r}/{p.vcpus})", "bad-stream-end")
        missing = sorted(set(range(p.vcpus)) - set(self._next_chunk))
        _need(not missing, f"StreamEnd before any chunk of vCPU(s) {missing[:16]}", "incomplete-stream")
        _need(ev.chunks == self._chunks, f"StreamEnd counts {ev.chunks} chunks; {self._chunks} were streamed",
              "incomplete-stream")
        _need(ev.digest == self._digest.digest(), "StreamEnd digest does not match the chunks streamed",
              "stream-digest-mismatch")
        self._stream_digest = ev.digest
        self._decoder.reserve(0)                # the chunks keep what they use of a reservation

    def _check_Commit(self, sender: str, ev: Commit) -> None:
        _need(ev.migration_id == self.proposal.migration_id, f"Commit for migration {ev.migration_id!r}",
              "wrong-migration")
        _need(ev.digest == self._stream_digest, "Commit digest differs from the streamed set's digest",
              "commit-digest-mismatch")

    def _check_Inquiry(self, sender: str, ev: Inquiry) -> None:
        _need((self.version or 1) >= INQUIRY_SINCE, f"Inquiry in a protocol {self.version} session (needs "
                                                    f"{INQUIRY_SINCE})", "unexpected-message")
        self.inquiry = ev

    def _check_Answer(self, sender: str, ev: Answer) -> None:
        _need(ev.migration_id == self.inquiry.migration_id and ev.vm_id == self.inquiry.vm_id,
              f"Answer about {ev.migration_id!r} / {ev.vm_id!r}, asked about {self.inquiry.migration_id!r} / "
              f"{self.inquiry.vm_id!r}", "wrong-migration")
