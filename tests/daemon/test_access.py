"""Access by role (daemon/pki.py, daemon/tls.py, daemon/rpcaccess.py METHOD_ROLES): an orchestrator certificate cannot act
as a peer, a peer certificate cannot act as an orchestrator, a certificate without a role is refused everywhere,
and one caller's createVm quota."""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import trio

from invariantd.client.demo import SRC_PROFILE
from invariantd.client.exits import for_kind
from invariantd.daemon.rpcclient import Client, RpcError, client_ssl
from invariantd.daemon import tls
from invariantd.daemon.peer import PeerConfig, PeerError, inquire
from invariantd.daemon.pki import make_pki
from invariantd.daemon.server import make_backend, run
from support.cluster import call, cfg




async def daemon(nursery, pki, **rpc):
    c = cfg("node-a", pki, SRC_PROFILE)
    c = replace(c, rpc=replace(c.rpc, **rpc))
    return await nursery.start(partial(run, c, backend=make_backend(c)))


def client(pki, who, ports) -> Client:
    return Client(f"127.0.0.1:{ports['rpc']}", client_ssl(pki[who], None, pki["ca"]), server_hostname="localhost",
                  timeout=5)


async def test_rpc_methods_by_role(nursery, pki):
    ports = await daemon(nursery, pki)
    with client(pki, "operator", ports) as c:                      # orchestrator: the orchestrator methods
        assert (await call(c.create_vm, "op-1", 1))["state"] == "running"
        with pytest.raises(RpcError) as ei:                         # ... not a peer's step
            await call(c.prepare_vmm, "op-1", "m1", b"", b"\0" * 32)
        assert ei.value.kind == "forbidden" and for_kind(ei.value.kind) == 8
        assert "operator (orchestrator) may not call prepare_vmm: that takes the peer role" in ei.value.message
    with client(pki, "node-b", ports) as c:                        # peer: caps and the VMM steps only
        assert (await call(c.caps))["arch"] == "aarch64"
        for fn, args in ((c.create_vm, ("p-1", 1)), (c.list_vms, ()), (c.migrate, ("op-1", "node-b")),
                         (c.resolve_vm, ("op-1", "node-b", "resume")), (c.remove_vm, ("op-1",))):
            with pytest.raises(RpcError) as ei:
                await call(fn, *args)
            assert ei.value.kind == "forbidden", fn
            assert "node-b (peer) may not call" in ei.value.message
    with client(pki, "operator", ports) as c:
        assert [v["name"] for v in await call(c.list_vms)] == ["op-1"]       # nothing a peer asked for happened


async def test_a_certificate_without_a_role_is_refused(nursery, pki, caplog):
    ports = await daemon(nursery, pki)
    with pytest.raises(RpcError) as ei:
        with client(pki, "nobody", ports) as c:
            await call(c.list_vms)
    assert ei.value.kind in ("unreachable", "internal")
    assert "certificate 'nobody' has no invariantd role" in caplog.text


async def test_an_orchestrator_certificate_cannot_act_as_a_peer(nursery, pki, caplog):
    ports = await daemon(nursery, pki)
    op_ctx = tls.client_context(pki["operator"], None, pki["ca"])
    s = await tls.connect("127.0.0.1", ports["peer"], op_ctx, server_hostname="localhost")   # the server is a peer
    with pytest.raises(PeerError):
        await inquire(s, "m", "vm", cfg=PeerConfig(handshake_timeout=3))
    assert "has role orchestrator; this listener takes urn:invariantd:role:peer" in caplog.text


async def test_a_daemon_hands_vms_only_to_a_peer(nursery, pki):
    """A listener presenting an orchestrator certificate is not a peer: connect refuses it before any byte."""
    ctx = tls.server_context(pki["operator"], None, pki["ca"])

    async def handler(stream):
        await stream.do_handshake()
        await trio.sleep(5)
    listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, handler, 0, ctx, host="127.0.0.1"))
    port = listeners[0].transport_listener.socket.getsockname()[1]
    with pytest.raises(tls.TlsError, match="certificate 'operator' has role orchestrator; a daemon hands VMs only "
                                           "to urn:invariantd:role:peer"):
        await tls.connect("127.0.0.1", port, tls.client_context(pki["node-a"], None, pki["ca"]),
                          server_hostname="localhost")


async def test_create_vm_quota_per_caller(nursery, pki, tmp_path):
    ports = await daemon(nursery, pki, max_vms_per_caller=2, max_vcpus_per_caller=3, unix=str(tmp_path / "r.sock"))
    with client(pki, "operator", ports) as c:
        await call(c.create_vm, "q-1", 1)
        await call(c.create_vm, "q-2", 2)
        with pytest.raises(RpcError) as ei:
            await call(c.create_vm, "q-3", 1)
        assert ei.value.kind == "forbidden" and "operator holds 2 VMs / 3 vCPUs here" in ei.value.message
        await call(c.remove_vm, "q-2")
        with pytest.raises(RpcError, match="exceeds its quota"):
            await call(c.create_vm, "q-3", 3)                          # 1 + 3 vCPUs > 3
        await call(c.create_vm, "q-3", 2)
    with Client(f"unix:{tmp_path / 'r.sock'}") as u:                   # another caller (uid N) has its own quota
        assert (await call(u.create_vm, "u-1", 1))["state"] == "running"
