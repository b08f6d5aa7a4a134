"""Serving the orchestrator RPC: listeners in trio, the Cap'n Proto server on its own thread, a relay between.

    TCP (mutual TLS only)   trio: tls.PeerListener (connection caps: total, per address, in the TLS handshake;
                            the certificate's role, daemon/pki.py)   --+
    unix socket (0660)      trio: SO_PEERCRED -> "uid N", orchestrator |-- socketpair --> capnp thread:
                                                                    --+   TwoPartyServer(Impl bound to the caller)

Every listener is trio's, so connection caps and who-is-calling are decided in one place before a byte reaches
Cap'n Proto; pycapnp only ever serves one end of a socketpair (its asyncio transport hides the TLS peer
certificate, which is why the TLS ends here). Each connection's Impl is bound to its Caller; rpcaccess.METHOD_ROLES
says which methods each role may call. Only plain Python data crosses between the threads (Bridge).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct

import outcome
import trio

from . import tls
from .capnploop import CapnpLoop
from .rpc import Orchestrator, RpcFailure
from .rpcaccess import Caller
from .rpcimpl import impl_class

log = logging.getLogger("invariantd.rpc")

RELAY_BYTES = 64 * 1024
MAX_UNIX_CONNECTIONS = 256


class Bridge:
    """capnp thread -> trio: run an async trio function in the service's nursery, await its outcome."""

    def __init__(self, token: trio.lowlevel.TrioToken, nursery: trio.Nursery) -> None:
        self.token, self.nursery = token, nursery

    async def to_trio(self, fn, *args):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def deliver(res):
            if not fut.done():
                fut.set_result(res)

        async def runner():
            res = await outcome.acapture(fn, *args)
            try:
                loop.call_soon_threadsafe(deliver, res)
            except RuntimeError:          # the capnp loop is gone (shutdown)
                pass
        try:
            self.token.run_sync_soon(self.nursery.start_soon, runner)
        except trio.RunFinishedError:
            raise RpcFailure("internal", "daemon is shutting down") from None
        return (await fut).unwrap()


class CapnpThread(CapnpLoop):
    """The Cap'n Proto loop serving the RPC on sockets handed to it (adopt)."""

    def __init__(self, orch: Orchestrator, bridge: Bridge) -> None:
        super().__init__("invariantd-rpc")
        self.orch, self.bridge = orch, bridge
        self._conns: set = set()

    def on_start(self) -> None:
        self._impl = impl_class()

    def on_stop(self) -> None:
        for c in list(self._conns):
            try:
                c.close()
            except Exception:
                pass

    async def _serve(self, sock: socket.socket, caller: Caller) -> None:
        import capnp
        try:
            stream = await capnp.AsyncIoStream.create_connection(sock=sock)
        except Exception as e:
            log.warning("RPC connection from %s could not be served: %s", caller.name, e)
            sock.close()
            return
        srv = capnp.TwoPartyServer(stream, bootstrap=self._impl(self.orch, self.bridge, caller))
        self._conns.add(srv)
        try:
            await srv.on_disconnect()
        except Exception:
            pass
        finally:
            self._conns.discard(srv)

    def adopt(self, sock: socket.socket, caller: Caller) -> None:
        """Serve the Cap'n Proto RPC on `sock` (one end of a socketpair) for `caller`. Called from trio."""
        self.call_soon(lambda: asyncio.ensure_future(self._serve(sock, caller)))


async def relay(outer: trio.abc.Stream, th: CapnpThread, caller: Caller) -> None:
    """Bytes both ways between the caller's stream and a socketpair whose other end the capnp thread serves."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    th.adopt(theirs, caller)
    inner = trio.SocketStream(trio.socket.from_stdlib_socket(mine))

    async def pump(src: trio.abc.ReceiveStream, dst: trio.abc.SendStream, scope: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(RELAY_BYTES):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            scope.cancel()                # one side closed: the connection is over
    try:
        async with trio.open_nursery() as n:
            n.start_soon(pump, outer, inner, n.cancel_scope)
            n.start_soon(pump, inner, outer, n.cancel_scope)
    finally:
        await trio.aclose_forcefully(inner)


def peer_uid(stream: trio.SocketStream) -> int | None:
    try:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    except OSError:
        return None


async def serve_unix(path: str, handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A unix stream listener at `path`, mode 0660 (the daemon's group may call), at most MAX_UNIX_CONNECTIONS."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    try:
        await sock.bind(path)
        os.chmod(path, 0o660)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"the RPC unix socket {path}: {e.strerror or e}") from None
    open_ = [0]

    async def on_conn(stream: trio.SocketStream) -> None:
        if open_[0] >= MAX_UNIX_CONNECTIONS:
            log.warning("rpc refused: %s: too many connections open", path)
            await trio.aclose_forcefully(stream)
            return
        open_[0] += 1
        try:
            await handler(stream)
        except Exception as e:            # one connection never takes the listener down
            log.exception("rpc %s: connection failed: %s", path, e)
        finally:
            open_[0] -= 1
            await trio.aclose_forcefully(stream)
    try:
        async with trio.open_nursery() as n:
            await n.start(trio.serve_listeners, on_conn, [trio.SocketListener(sock)])
            task_status.started(path)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


async def serve_rpc(orch: Orchestrator, host: str = "", port: int | None = None, unix: str = "",
                    ssl_ctx=None, *, handshake_timeout: float = 10.0,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the orchestrator RPC until cancelled. task_status.started({'rpc': port, 'rpc_unix': path}).
    A TCP listener (host and port set) needs ssl_ctx: the RPC never listens on TCP in plaintext."""
    tcp = bool(host) and port is not None
    if tcp and ssl_ctx is None:
        raise OSError(f"RPC on {host}:{port} without TLS: refused (set rpc.tls = true, or use the unix socket)")
    async with trio.open_nursery() as n:
        await n.start(orch.run)
        th = CapnpThread(orch, Bridge(trio.lowlevel.current_trio_token(), n))
        th.start()
        try:
            await trio.to_thread.run_sync(th.started.wait, abandon_on_cancel=True)
            if th.error is not None:
                raise OSError(f"the RPC service cannot start: {th.error}") from th.error
            bound: dict = {}

            async def on_tls(stream: trio.SSLStream, who: str) -> None:
                await relay(stream, th, Caller(tls.cert_roles(stream), who))

            async def on_unix(stream: trio.SocketStream) -> None:
                uid = peer_uid(stream)
                await relay(stream, th, Caller(frozenset({"orchestrator"}), f"uid {uid}" if uid is not None
                                               else "unix"))
            if tcp:
                listener = tls.PeerListener(on_tls, ssl_ctx, host, port, handshake_timeout=handshake_timeout,
                                            roles=frozenset({"peer", "orchestrator"}), what="rpc")
                bound["rpc"] = await n.start(listener.run)
            if unix:
                bound["rpc_unix"] = await n.start(serve_unix, unix, on_unix)
            log.info("RPC service on %s", ", ".join(f"{k}={v}" for k, v in bound.items()) or "nothing")
            task_status.started(bound)
            await trio.sleep_forever()
        finally:
            th.stop()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(th.thread.join, 5)
            n.cancel_scope.cancel()
