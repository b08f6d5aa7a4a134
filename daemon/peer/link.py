"""The peer link: one connection's conversation (Conn over protocol.session), its errors and settings, and the
short exchanges that are not migrations (a capabilities fetch, an inquiry about a migration)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import trio

from ...protocol import schemas as S
from ...protocol import session as ps
from ...protocol.errors import ProtocolError, RemoteProtocolError
from ...protocol.framing import Limits
from .. import failpoints
from ..apply import ApplyError
from ..metrics import Metrics


log = logging.getLogger("invariantd.peer")


PLAN_FORMAT = S.PLAN_FORMAT                             # invariantd.capnp Plan; digest = plandigest.plan_digest


CAPS_FORMAT = S.HOST_CAPNP_FORMAT                       # invariantd.capnp HostCapabilities


RECEIVE_BYTES = 256 * 1024


TLS_RECORD = 16384                       # TLS's largest record (plaintext bytes)


class PeerError(Exception):
    """A migration over the peer link failed. kind: tls | protocol | aborted | plan | preflight | apply |
    timeout | closed | vm; the message says what happened and, where known, what to do."""

    def __init__(self, kind: str, msg: str, code: str = "") -> None:
        super().__init__(f"{kind}: {msg}")
        self.kind = kind
        self.code = code                 # kind "aborted": the peer's Abort code


CAPS_ONLY = "caps-only"                  # Abort code of a capabilities fetch (rpc plan): not a migration


@dataclass(frozen=True)
class PeerConfig:
    node: str = "invariantd"
    chunk_registers: int = 4096          # per chunk; a vCPU's whole set (~300 registers) in one message
    chunk_bytes: int = 1 << 20           # protocol 2: vCPUs sharing a register list go together up to this size
                                         # (fewer, larger events: the per-chunk cost is paid ~3x for 256 SVE vCPUs)
    checksum: str = "xxh3"               # per chunk; with a peer older than its protocol (CHECKSUM_SINCE): crc32
    limits: Limits = Limits()
    handshake_timeout: float = 10.0
    phase_timeout: float = 30.0          # plan, preflight, each received message while streaming
    apply_timeout: float = 60.0          # destination apply + verify (source waits this long for Commit)
    commit_timeout: float = 30.0
    send_batch_bytes: int = 256 * 1024   # stream bytes per TLS write
    first_batch_bytes: int = 64 * 1024   # the first write: the destination starts reading sooner
    pipeline_vcpus: int = 32             # real KVM: chunks sent every N vCPUs read, the rest read meanwhile
                                         # (peer/pipeline.py); 0: every vCPU read before the stream starts
    pipeline_same_host: bool = False     # pipeline with a peer on this machine too (same_host: it shares our
                                         # CPUs, so by default not; a bench pins the two ends to emulate hosts)
    versions: tuple[int, ...] = ps.PROTOCOL_VERSIONS   # peer protocol versions spoken (pin during a rolling upgrade)


@dataclass
class MigrationResult:
    migration_id: str
    vm_id: str
    result: str                          # committed | in-doubt
    events: list = field(default_factory=list)
    digest: bytes = b""


# --- the I/O shell ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """Events encoded back to back (Conn.prepare): the bytes, and each event with its first byte's offset."""
    data: memoryview
    events: list


class Conn:
    def __init__(self, stream: trio.abc.Stream, session: ps.Session, metrics: Metrics | None,
                 on_event: Callable[[str, object], None] | None = None) -> None:
        """on_event(direction, event): told of every event sent ("out") and received ("in"), e.g. for progress."""
        self.stream, self.session, self.metrics = stream, session, metrics
        self.on_event = on_event or (lambda direction, event: None)
        self._written = 0

    async def send(self, event) -> None:
        self.on_event("out", event)
        await self._write(self.session.send(event))

    def prepare(self, events) -> "Prepared":
        """Encode events into one buffer for send_prepared (the session counts them as sent from here on;
        send_failed() if they never go out). The source does this right after reading the paused VM, so that
        the stream phase only writes."""
        parts: list = []
        starts: list[tuple[int, object]] = []
        pos = 0
        for ev in events:
            p = self.session.send_parts(ev)
            starts.append((pos, ev))
            parts.extend(p)
            pos += sum(map(len, p))
        return Prepared(memoryview(b"".join(parts)), starts)

    async def send_prepared(self, prep: "Prepared", batch_bytes: int = 256 * 1024, timeout: float | None = None,
                            first_bytes: int = 0) -> None:
        """Write prepared events as one byte stream in pieces of batch_bytes (the first of first_bytes, when set:
        the receiver starts on it sooner), one TLS write each, straight from the buffer (a frame may straddle two
        writes: the peer reads a byte stream). Pieces are multiples of TLS_RECORD bytes, so every TLS record is
        full: no short record for the receiver to read and decrypt on its own. batch_bytes < TLS_RECORD: each
        event is written alone (tests cut the stream there). on_event("out", ev) is told as ev's first byte is
        about to be written. timeout: seconds each write may take (a stalled peer is noticed per write)."""
        data, evs = prep.data, prep.events
        told = 0

        def tell(upto: int) -> None:
            nonlocal told
            while told < len(evs) and evs[told][0] < upto:
                self.on_event("out", evs[told][1])
                told += 1
        if batch_bytes < TLS_RECORD:
            bounds = [start for start, _ in evs] + [len(data)]
            for i in range(len(evs)):
                tell(bounds[i] + 1)
                await self._write(data[bounds[i]:bounds[i + 1]], timeout)
            return
        pos, limit = 0, min(first_bytes or batch_bytes, batch_bytes)
        while pos < len(data):
            piece = max(TLS_RECORD, limit - limit % TLS_RECORD)
            tell(pos + piece)
            await self._write(data[pos:pos + piece], timeout)
            pos += piece
            limit = batch_bytes

    async def _write(self, data: bytes, timeout: float | None = None) -> None:
        cut = failpoints.byte_cut(self.session.our_role) if failpoints.ACTIVE else None
        if cut is not None:                 # fault injection (failpoints.py): the stream breaks after `cut` bytes
            if self._written + len(data) > cut:
                await self.stream.send_all(data[:max(0, cut - self._written)])
                self._written = cut
                self.session.send_failed()
                raise trio.BrokenResourceError(f"failpoint {self.session.our_role}.bytes: cut after {cut} bytes")
            self._written += len(data)
        try:
            if timeout is None:
                await self.stream.send_all(data)
            else:
                with trio.fail_after(timeout):
                    await self.stream.send_all(data)
        except BaseException:
            self.session.send_failed()
            raise
        if self.metrics:
            self.metrics.stream("sent", len(data))

    async def receive(self):
        got = 0                       # counted once per event, not per TLS record (16 KiB each)
        session, stream = self.session, self.stream
        try:
            while True:
                ev = session.next_event()
                if ev is not ps.NEED_DATA:
                    self.on_event("in", ev)
                    return ev
                while True:               # a frame spans many TLS records: ask for the event once it can be whole
                    data = await stream.receive_some(RECEIVE_BYTES)
                    got += len(data)
                    if session.receive_data(data):
                        break
        finally:
            if self.metrics and got:
                self.metrics.stream("received", got)

    async def expect(self, *types):
        ev = await self.receive()
        if isinstance(ev, ps.Abort):
            raise PeerError("aborted", f"peer aborted ({ev.code or 'no code'}): {ev.reason}", ev.code)
        if isinstance(ev, ps.ConnectionClosed):
            raise PeerError("closed", "peer closed the connection")
        if not isinstance(ev, types):     # the session's state machine already refuses out-of-order messages
            raise PeerError("protocol", f"unexpected {type(ev).__name__}")
        return ev

    async def abort_quietly(self, reason: str, code: str) -> None:
        """Best effort: tell the peer, never raise, never block long."""
        if self.session.state in (ps.ABORTED, ps.DONE):
            return
        ab = ps.Abort(reason[:60000], code)
        with trio.move_on_after(2) as scope:
            scope.shield = True
            try:
                if self.session.state is ps.ERROR:
                    # the session is finished; a last Abort still tells the peer why (like an HTTP 400)
                    await self.stream.send_all(ps.encode(ab))
                else:
                    await self.send(ab)
            except Exception:
                pass


def _describe(e: BaseException) -> str:
    """An exception as an operator reads it (not trio's task and scope reprs)."""
    if isinstance(e, trio.Cancelled):
        return "cancelled (by request or daemon shutdown)"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def same_host(stream) -> bool:
    """Whether the peer at the other end of `stream` (TLS over a socket) is this machine: a loopback address or a
    unix socket. False when it cannot tell."""
    import ipaddress
    import socket
    s = stream
    while s is not None and not hasattr(s, "socket"):
        s = getattr(s, "transport_stream", None)
    try:
        sock = s.socket
        if sock.family == socket.AF_UNIX:
            return True
        return ipaddress.ip_address(sock.getpeername()[0].split("%")[0]).is_loopback
    except (AttributeError, OSError, ValueError, IndexError):
        return False


def _wrap(e: BaseException) -> PeerError | None:
    if isinstance(e, PeerError):
        return e
    if isinstance(e, RemoteProtocolError):
        return PeerError("protocol", f"peer broke the protocol ({e.what}): {e}")
    if isinstance(e, ProtocolError):
        return PeerError("protocol", str(e))
    if isinstance(e, trio.TooSlowError):
        return PeerError("timeout", "peer did not answer in time")
    if isinstance(e, (trio.BrokenResourceError, trio.ClosedResourceError)):
        cause = e.__cause__
        return PeerError("closed", f"connection lost{': ' + str(cause) if cause else ''} (if this is the first "
                                   f"message, the peer may have refused our certificate)")
    if isinstance(e, ApplyError):
        return PeerError("apply", str(e))
    return None


async def inquire(stream: trio.abc.Stream, migration_id: str, vm_id: str, *,
                  cfg: PeerConfig = PeerConfig()) -> ps.Answer:
    """Ask a peer (protocol 5) what it decided for a migration and what it holds of its VM."""
    conn = Conn(stream, ps.Session(ps.SOURCE, cfg.limits, cfg.versions), None)
    try:
        with trio.fail_after(cfg.handshake_timeout):
            await conn.send(ps.Hello(cfg.versions, ps.SOURCE, cfg.node))
            await conn.expect(ps.Hello)
            await conn.expect(ps.Capabilities)
            if (conn.session.version or 1) < ps.INQUIRY_SINCE:
                await conn.abort_quietly("inquiry needs protocol 5", CAPS_ONLY)
                raise PeerError("protocol", f"the peer speaks protocol {conn.session.version}: it cannot be asked "
                                            f"about a migration (upgrade it to protocol {ps.INQUIRY_SINCE})")
            await conn.send(ps.Inquiry(migration_id, vm_id))
            return await conn.expect(ps.Answer)
    except BaseException as e:
        err = _wrap(e)
        if err is not None and err is not e:
            raise err from e
        raise


async def fetch_capabilities(stream: trio.abc.Stream, *, cfg: PeerConfig = PeerConfig()) -> ps.Capabilities:
    """A peer's capability document without migrating: Hello, its Hello and Capabilities, then an Abort coded
    caps-only (the peer logs no failed migration for it)."""
    conn = Conn(stream, ps.Session(ps.SOURCE, cfg.limits, cfg.versions), None)
    try:
        with trio.fail_after(cfg.handshake_timeout):
            await conn.send(ps.Hello(cfg.versions, ps.SOURCE, cfg.node))
            await conn.expect(ps.Hello)
            caps = await conn.expect(ps.Capabilities)
        await conn.abort_quietly("capabilities only (plan)", CAPS_ONLY)
        return caps
    except BaseException as e:
        err = _wrap(e)
        if err is not None and err is not e:
            raise err from e
        raise


def decode_caps(ev: ps.Capabilities) -> S.HostCapabilities:
    if ev.format != CAPS_FORMAT:
        raise PeerError("protocol", f"destination capabilities in format {ev.format!r}; this daemon reads "
                                    f"{CAPS_FORMAT!r} (upgrade the older daemon)")
    try:
        return S.host_from_bytes(ev.doc)
    except S.SchemaError as e:
        raise PeerError("protocol", f"destination capabilities: {e}") from None
