"""The Python client of the orchestrator RPC (protocol/schemas/rpc.capnp): one request path, one error type.
Used by invariantctl (client/) and by the daemon itself when it calls a peer daemon's RPC (daemon/rpc.py).

    with Client("127.0.0.1:7444") as c:          # or "unix:/run/invariantd/rpc.sock"; ssl=client context
        c.create_vm("vm-1", 2)
        mid = c.migrate("vm-1", "b")
        st = c.wait(mid)                           # dict: state, phase, bytes_sent, vcpus_done/total, ...

Every daemon-side failure raises RpcError(kind, message), kind an ErrorKind of rpc.capnp (invariantctl's exit
code for each kind: client/exits.py). pycapnp 2.x RPC is asyncio-only: `Client` runs one asyncio loop with the KJ loop in a
private thread and hands plain Python data (dicts, bytes) across, so it can be used from plain code, from a
trio program (via trio.to_thread) and from several threads. `AsyncClient` is the same over an existing
asyncio + capnp.kj_loop() (e.g. inside the daemon's RPC thread).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import ssl
from functools import lru_cache
from typing import Any

from ..protocol import schemas as S
from .capnploop import CapnpLoop
from .rpcmarshal import migration_status, vm_info
from .tls import client_context

DEFAULT_RPC_PORT = 7444
DEFAULT_ADDR = "unix:/run/invariantd/rpc.sock"   # the daemon's default (rpc.unix); TCP is mutual TLS only
ENV_ADDR = "INVARIANTD_ADDR"



@lru_cache(maxsize=1)
def kinds() -> tuple[str, ...]:
    """ErrorKind's enumerants, from rpc.capnp itself."""
    return tuple(rpc_schema().ErrorKind.schema.enumerants)


class RpcError(Exception):
    """A call failed. kind: an ErrorKind name (rpc.capnp) - badRequest, notFound, conflict, refused,
    unreachable (daemon or its peer), kvm, migrationFailed, internal."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind if kind in kinds() else "internal"
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def rpc_schema():
    """protocol/schemas/rpc.capnp (protocol.schemas.load_capnp: once per process)."""
    return S.load_capnp("rpc.capnp")


def default_addr() -> str:
    return os.environ.get(ENV_ADDR) or DEFAULT_ADDR


def parse_addr(addr: str) -> tuple[str, str, int]:
    """'host:port' | '[v6]:port' | 'unix:/path' | '/path' -> ('tcp', host, port) | ('unix', path, 0)."""
    if not addr:
        raise RpcError("badRequest", "empty daemon address")
    if addr.startswith("unix:"):
        return "unix", addr[5:], 0
    if addr.startswith("/"):
        return "unix", addr, 0
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = addr, str(DEFAULT_RPC_PORT)
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
        if not 0 < p < 65536:
            raise ValueError
    except ValueError:
        raise RpcError("badRequest", f"bad address {addr!r}: expected HOST:PORT or unix:/path") from None
    return "tcp", host, p


def client_ssl(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """A mutual-TLS client context (the cluster CA, this client's certificate), or None without a CA."""
    return client_context(cert, key or None, ca) if ca else None


# --- reader -> plain data ---------------------------------------------------------------------------------------
def _err(r) -> None:
    e = r.error
    kind = str(e.kind)
    if kind != "ok":
        raise RpcError(kind, e.message)


# --- asyncio client (inside a running capnp.kj_loop) ------------------------------------------------------------
class AsyncClient:
    def __init__(self, client, stream) -> None:
        self._client, self._stream = client, stream
        self.cap = client.bootstrap().cast_as(rpc_schema().Orchestrator)

    @classmethod
    async def connect(cls, addr: str, ssl_ctx: ssl.SSLContext | None = None, timeout: float = 10.0,
                      server_hostname: str | None = None) -> "AsyncClient":
        import capnp
        kind, host, port = parse_addr(addr)
        try:
            if kind == "unix":
                coro = capnp.AsyncIoStream.create_unix_connection(host, ssl=ssl_ctx,
                                                                  server_hostname=(server_hostname or "localhost")
                                                                  if ssl_ctx else None)
            else:
                kw = {"ssl": ssl_ctx, "server_hostname": server_hostname or host} if ssl_ctx else {}
                coro = capnp.AsyncIoStream.create_connection(host=host, port=port, **kw)
            stream = await asyncio.wait_for(coro, timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise RpcError("unreachable", f"cannot reach invariantd at {addr}: {e or 'timeout'}") from None
        except ssl.SSLError as e:
            raise RpcError("unreachable", f"TLS with invariantd at {addr} failed: {e}") from None
        return cls(capnp.TwoPartyClient(stream), stream)

    async def _call(self, method: str, **params):
        import capnp
        try:
            req = getattr(self.cap, method + "_request")()     # (keyword calls clash with a `name` param)
            for k, v in params.items():
                if isinstance(v, list):
                    lst = req.init(k, len(v))
                    for i, x in enumerate(v):
                        lst[i] = x
                else:
                    setattr(req, k, v)
            return await req.send()
        except capnp.KjException as e:
            t = getattr(e, "type", None)
            desc = (getattr(e, "description", None) or str(e)).strip().splitlines()
            msg = desc[-1] if desc else str(e)
            if t == "DISCONNECTED":
                raise RpcError("unreachable", f"connection to invariantd lost: {msg}") from None
            raise RpcError("internal", f"{method}: {msg}") from None

    async def caps(self, host: str = "") -> dict:
        r = await self._call("caps", host=host)
        _err(r)
        return json.loads(bytes(r.json))

    async def list_vms(self) -> list[dict]:
        r = await self._call("listVms")
        _err(r)
        return [vm_info(v) for v in r.vms]

    async def create_vm(self, name: str, vcpus: int, features: list[str] | tuple[str, ...] = ()) -> dict:
        if not 0 < vcpus < 1 << 32:
            raise RpcError("badRequest", f"vCPU count {vcpus}: expected a positive number")
        r = await self._call("createVm", name=name, nVcpus=vcpus, features=list(features))
        _err(r)
        return vm_info(r.vm)

    async def inspect_vm(self, name: str) -> dict:
        r = await self._call("inspectVm", name=name)
        _err(r)
        return vm_info(r.vm)

    async def plan(self, vm: str, to_host: str) -> dict:
        r = await self._call("plan", vm=vm, toHost=to_host)
        _err(r)
        p = r.result
        return {"migratable": p.migratable, "digest": bytes(p.digest).hex(), "destination": p.destination,
                "plan": json.loads(bytes(p.json)) if len(p.json) else None}

    async def migrate(self, vm: str, to_host: str) -> str:
        r = await self._call("migrate", vm=vm, toHost=to_host)
        _err(r)
        return r.migrationId

    async def status(self, migration_id: str) -> dict:
        r = await self._call("status", migrationId=migration_id)
        _err(r)
        return migration_status(r.status)

    async def list_migrations(self) -> list[dict]:
        r = await self._call("listMigrations")
        _err(r)
        return [migration_status(m) for m in r.migrations]

    async def cancel(self, migration_id: str) -> dict:
        r = await self._call("cancel", migrationId=migration_id)
        _err(r)
        return migration_status(r.status)

    async def wait(self, migration_id: str, timeout_ms: int = 0) -> dict:
        r = await self._call("wait", migrationId=migration_id, timeoutMs=timeout_ms)
        _err(r)
        return migration_status(r.status)

    async def peers(self) -> dict:
        r = await self._call("peers")
        _err(r)
        return {"node": r.node, "peers": [{"name": p.name, "address": p.address, "rpc": p.rpc} for p in r.peers]}

    async def remove_vm(self, name: str) -> None:
        _err(await self._call("removeVm", name=name))

    async def resolve_vm(self, name: str, peer: str, action: str) -> dict:
        r = await self._call("resolveVm", name=name, peer=peer, action=action)
        _err(r)
        return vm_info(r.vm) if r._has("vm") else {"name": name, "state": "removed"}

    # --- VMs a VMM runs
    async def _json(self, method: str, **params):
        r = await self._call(method, **params)
        _err(r)
        return json.loads(bytes(r.json))

    async def list_vmms(self) -> list[dict]:
        return await self._json("listVmms")

    async def vm_profile(self, name: str) -> dict:
        return await self._json("vmProfile", name=name)

    async def prepare_vmm(self, vm: str, migration_id: str, profile: bytes, digest: bytes) -> dict:
        return await self._json("prepareVmm", vm=vm, migrationId=migration_id, profile=profile, digest=digest)

    async def incoming_vmm(self, migration_id: str, qmp: str, uri: str) -> dict:
        return await self._json("incomingVmm", migrationId=migration_id, qmp=qmp, uri=uri)

    async def vmm_status(self, migration_id: str) -> dict:
        return await self._json("vmmStatus", migrationId=migration_id)

    async def migrate_vmm(self, vm: str, to_host: str, qmp: str, uri: str, dest_qmp: str = "") -> str:
        r = await self._call("migrateVmm", vm=vm, toHost=to_host, qmp=qmp, uri=uri, destQmp=dest_qmp)
        _err(r)
        return r.migrationId

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:
            pass
        try:
            self._stream.close()
        except Exception:
            pass


# --- blocking facade: one private thread with asyncio + the KJ loop ---------------------------------------------
class _LoopThread(CapnpLoop):
    def __init__(self) -> None:
        super().__init__("invariantd-rpc-client")
        self.start()
        self.started.wait()
        if self.error:
            raise self.error

    def run(self, coro, timeout: float | None):
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise RpcError("unreachable", f"invariantd did not answer within {timeout}s") from None

    def stop(self) -> None:
        super().stop(join=5)


class Client:
    """Blocking client; usable as a context manager. Connects lazily on the first call."""

    def __init__(self, addr: str | None = None, ssl_ctx: ssl.SSLContext | None = None, *, timeout: float = 30.0,
                 server_hostname: str | None = None) -> None:
        self.addr = addr or default_addr()
        parse_addr(self.addr)
        self.ssl_ctx, self.timeout, self.server_hostname = ssl_ctx, timeout, server_hostname
        self._lt: _LoopThread | None = None
        self._ac: AsyncClient | None = None

    def _call(self, name: str, *args, timeout: float | None = None):
        if self._lt is None:
            self._lt = _LoopThread()

        async def go():
            if self._ac is None:
                self._ac = await AsyncClient.connect(self.addr, self.ssl_ctx, min(self.timeout, 10.0),
                                                     self.server_hostname)
            return await getattr(self._ac, name)(*args)
        return self._lt.run(go(), timeout or self.timeout)

    def caps(self, host: str = "") -> dict:
        return self._call("caps", host)

    def list_vms(self) -> list[dict]:
        return self._call("list_vms")

    def create_vm(self, name: str, vcpus: int, features=()) -> dict:
        return self._call("create_vm", name, vcpus, list(features))

    def inspect_vm(self, name: str) -> dict:
        return self._call("inspect_vm", name)

    def plan(self, vm: str, to_host: str) -> dict:
        return self._call("plan", vm, to_host)

    def migrate(self, vm: str, to_host: str) -> str:
        return self._call("migrate", vm, to_host)

    def status(self, migration_id: str) -> dict:
        return self._call("status", migration_id)

    def list_migrations(self) -> list[dict]:
        return self._call("list_migrations")

    def cancel(self, migration_id: str) -> dict:
        return self._call("cancel", migration_id)

    def wait(self, migration_id: str, timeout_ms: int = 0) -> dict:
        return self._call("wait", migration_id, timeout_ms, timeout=(timeout_ms or 30000) / 1000 + self.timeout)

    def peers(self) -> dict:
        return self._call("peers")

    def remove_vm(self, name: str) -> None:
        return self._call("remove_vm", name)

    def resolve_vm(self, name: str, peer: str, action: str) -> dict:
        return self._call("resolve_vm", name, peer, action)

    def list_vmms(self) -> list[dict]:
        return self._call("list_vmms")

    def vm_profile(self, name: str) -> dict:
        return self._call("vm_profile", name)

    def prepare_vmm(self, vm: str, migration_id: str, profile: bytes, digest: bytes) -> dict:
        return self._call("prepare_vmm", vm, migration_id, profile, digest)

    def incoming_vmm(self, migration_id: str, qmp: str, uri: str) -> dict:
        return self._call("incoming_vmm", migration_id, qmp, uri)

    def vmm_status(self, migration_id: str) -> dict:
        return self._call("vmm_status", migration_id)

    def migrate_vmm(self, vm: str, to_host: str, qmp: str, uri: str, dest_qmp: str = "") -> str:
        return self._call("migrate_vmm", vm, to_host, qmp, uri, dest_qmp)

    def close(self) -> None:
        if self._lt is not None:
            if self._ac is not None:
                ac, self._ac = self._ac, None
                try:
                    self._lt.loop.call_soon_threadsafe(ac.close)
                except RuntimeError:
                    pass
            self._lt.stop()
            self._lt = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
