"""Mutual TLS between daemons: contexts against one cluster CA, the peer listener, outgoing connections.

Every node has one certificate issued by the cluster CA, used as server and as client certificate. Both
sides require and verify the other's certificate (TLS 1.3 only). The peer identity is the certificate's
common name (or its first DNS SAN); `allowed_peers` can narrow who may connect. The certificate's role (URI SAN,
daemon/pki.py) decides what it may do: a listener takes only the roles it serves, and a daemon connecting to a
peer checks that the other end is a peer.
"""
from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from functools import partial
from typing import Awaitable, Callable

import trio

from .pki import ROLE_URIS

log = logging.getLogger("invariantd.tls")


class TlsError(Exception):
    """The TLS connection could not be set up; the message says with whom and why."""


def _base(purpose: ssl.Purpose, cert_file: str | None, key_file: str | None, ca_file: str) -> ssl.SSLContext:
    """The one TLS context factory: TLS 1.3 only, the other side verified against the cluster CA."""
    ctx = ssl.create_default_context(purpose, cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def server_context(cert_file: str, key_file: str | None, ca_file: str) -> ssl.SSLContext:
    """Listener side: presents our certificate, requires a client certificate from the cluster CA."""
    return _base(ssl.Purpose.CLIENT_AUTH, cert_file, key_file, ca_file)


def client_context(cert_file: str | None, key_file: str | None, ca_file: str) -> ssl.SSLContext:
    """Connecting side (a daemon to its peer, invariantctl to a daemon's RPC): verifies the server against the
    cluster CA (and its name), presents our certificate (none: a listener requiring one refuses us)."""
    ctx = _base(ssl.Purpose.SERVER_AUTH, cert_file, key_file, ca_file)
    ctx.check_hostname = True
    return ctx


def peer_identity(stream: trio.SSLStream) -> str:
    cert = stream.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    for kind, v in cert.get("subjectAltName", ()):
        if kind in ("DNS", "email", "IP Address"):
            return v
    return "?"


def cert_roles(stream: trio.SSLStream) -> frozenset[str]:
    """The roles the other end's (verified) certificate carries: its URI SANs that daemon/pki.py names."""
    uris = {v for kind, v in (stream.getpeercert() or {}).get("subjectAltName", ()) if kind == "URI"}
    return frozenset(role for role, uri in ROLE_URIS.items() if uri in uris)


def role_problem(roles: frozenset[str], allowed: frozenset[str], who: str, where: str = "this listener takes") -> str:
    """"" when a certificate with `roles` may use a listener serving `allowed`, else the one line saying why."""
    if roles & allowed:
        return ""
    want = " or ".join(ROLE_URIS[r] for r in sorted(allowed))
    has = "role " + ", ".join(sorted(roles)) if roles else "no invariantd role"
    return f"certificate {who!r} has {has}; {where} {want} (URI subjectAltName; daemon/pki.py)"


async def connect(host: str, port: int, ctx: ssl.SSLContext, *, server_hostname: str | None = None,
                  timeout: float = 10.0, require_role: str | None = "peer") -> trio.SSLStream:
    """TCP + TLS handshake with a deadline; TlsError names the peer and the reason. require_role: the role the
    server's certificate must carry (a daemon only hands a VM to a peer)."""
    try:
        with trio.fail_after(timeout):
            tcp = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as e:
        raise TlsError(f"cannot reach peer {host}:{port}: {e or 'timeout'}") from e
    s = trio.SSLStream(tcp, ctx, server_hostname=server_hostname or host)
    try:
        with trio.fail_after(timeout):
            await s.do_handshake()
    except trio.TooSlowError:
        await trio.aclose_forcefully(tcp)
        raise TlsError(f"TLS handshake with {host}:{port} timed out after {timeout}s") from None
    except trio.BrokenResourceError as e:
        await trio.aclose_forcefully(tcp)
        cause = e.__cause__ or e
        raise TlsError(f"TLS handshake with {host}:{port} failed: {cause} (is its certificate from our cluster CA, "
                       f"and is ours from theirs?)") from e
    if require_role is not None:
        why = role_problem(cert_roles(s), frozenset({require_role}), peer_identity(s), "a daemon hands VMs only to")
        if why:
            await trio.aclose_forcefully(s)
            raise TlsError(f"{host}:{port}: {why}")
    return s


Handler = Callable[[trio.SSLStream, str], Awaitable[None]]


@dataclass
class PeerListener:
    """Accepts TCP, completes the TLS handshake with a deadline, checks the identity, runs handler(stream, peer)."""
    handler: Handler
    ctx: ssl.SSLContext
    host: str = "127.0.0.1"
    port: int = 7443
    handshake_timeout: float = 10.0
    allowed_peers: frozenset[str] | None = None
    roles: frozenset[str] | None = frozenset({"peer"})    # certificate roles this listener takes (None: any)
    what: str = "peer"                     # in log lines: "peer refused: ..."
    max_connections: int = 256             # open at once, authenticated or not (each costs an fd and buffers)
    max_unauthenticated: int = 64          # still in the TLS handshake (the cheap way to exhaust fds)
    max_per_address: int = 32              # from one remote address
    refused: list[str] = field(default_factory=list)      # recent refusals (bounded), for status and tests
    _open: int = 0
    _handshaking: int = 0
    _per_address: dict = field(default_factory=dict)
    _last_flood_log: float = -1e9

    def _refuse(self, why: str, flood: bool = False) -> None:
        now = trio.current_time()
        if not flood or now - self._last_flood_log >= 1.0:     # a flood of connections: one line a second
            log.warning("%s refused: %s", self.what, why)
            self._last_flood_log = now if flood else self._last_flood_log
        self.refused.append(why)
        del self.refused[:-100]

    async def _on_conn(self, tcp: trio.SocketStream) -> None:
        try:
            addr = tcp.socket.getpeername()
            addr = f"{addr[0]}:{addr[1]}"
        except OSError:
            addr = "?"
        host = addr.rsplit(":", 1)[0]
        why = ("too many connections open" if self._open >= self.max_connections else
               "too many connections in their TLS handshake" if self._handshaking >= self.max_unauthenticated else
               f"too many connections from {host}" if self._per_address.get(host, 0) >= self.max_per_address else "")
        if why:
            self._refuse(f"{addr}: {why}", flood=True)
            await trio.aclose_forcefully(tcp)
            return
        self._open += 1
        self._handshaking += 1
        self._per_address[host] = self._per_address.get(host, 0) + 1
        handshaking = True
        s = trio.SSLStream(tcp, self.ctx, server_side=True)
        try:
            try:
                with trio.fail_after(self.handshake_timeout):
                    await s.do_handshake()
                self._handshaking -= 1
                handshaking = False
            except trio.TooSlowError:
                self._refuse(f"{addr}: TLS handshake timed out")
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self._refuse(f"{addr}: TLS handshake failed: {e.__cause__ or e}")
                return
            who = peer_identity(s)
            if self.allowed_peers is not None and who not in self.allowed_peers:
                self._refuse(f"{addr}: certificate {who!r} is not an allowed peer")
                return
            why = role_problem(cert_roles(s), self.roles, who) if self.roles is not None else ""
            if why:
                self._refuse(f"{addr}: {why}")
                return
            try:
                await self.handler(s, who)
            except Exception as e:     # one connection's failure never takes the listener (or the daemon) down
                log.exception("peer %s (%s): connection handler failed: %s: %s", who, addr, type(e).__name__, e)
        finally:
            self._open -= 1
            self._handshaking -= handshaking
            self._per_address[host] -= 1
            if not self._per_address[host]:
                del self._per_address[host]
            await trio.aclose_forcefully(s)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; task_status.started(port) reports the bound port."""
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as e:
            raise OSError(e.errno, f"the {self.what} listener cannot listen on {self.host}:{self.port}: "
                                   f"{e.strerror or e}") from None
        bound = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_listeners, self._on_conn, listeners, handler_nursery=nursery))
            task_status.started(bound)
