"""Orchestrator RPC (daemon/rpc.py, protocol/schemas/rpc.capnp): two in-process daemons (simulated hosts) on
loopback, mutual TLS on the peer link and on the RPC; a stock pycapnp RPC client and the Python client."""
from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from functools import partial

import pytest
import trio

from invariantd.client.demo import DST_PROFILE, SRC_PROFILE
from invariantd.daemon.pki import make_pki
from invariantd.client.exits import for_kind
from invariantd.daemon.rpcclient import Client, RpcError, client_ssl, parse_addr, rpc_schema
from invariantd.daemon import tls
from invariantd.daemon.config import (BackendConfig, Config, ConfigError, MetricsSection, PeerEntry, PeerSection,
                                      RpcSection, Timeouts, parse)
from invariantd.daemon.server import make_backend, run
from support.cluster import call, cfg, start_cluster












async def test_stock_capnp_client_round_trip(nursery, pki):
    """A plain pycapnp RPC client (no invariantd client code): bootstrap, cast, call."""
    cl = await start_cluster(nursery, pki)
    schema = rpc_schema()
    ctx = client_ssl(pki["operator"], None, pki["ca"])

    def stock():
        import capnp

        async def main():
            stream = await capnp.AsyncIoStream.create_connection(host="127.0.0.1", port=cl.a["rpc"], ssl=ctx,
                                                                 server_hostname="localhost")
            client = capnp.TwoPartyClient(stream)
            orch = client.bootstrap().cast_as(schema.Orchestrator)
            req = orch.createVm_request()
            req.name, req.nVcpus = "stock-vm", 3
            r = await req.send()
            assert r.error.kind == "ok" and r.vm.nVcpus == 3 and r.vm.state == "running"
            r = await orch.listVms()
            names = [v.name for v in r.vms]
            r2 = await orch.caps("")
            doc = bytes(r2.json)
            host = r2.host.kernelVersion
            bad = await orch.inspectVm_request().send()          # name "" -> typed error, no exception
            r3 = await orch.peers()
            return names, doc, host, str(bad.error.kind), [p.name for p in r3.peers], r3.node
        return asyncio.run(capnp.run(main()))

    names, doc, host_kernel, bad_kind, peers, node = await trio.to_thread.run_sync(stock)
    assert names == ["stock-vm"]
    assert b'"kernel_version": "6.12"' in doc and host_kernel == "6.12"
    assert bad_kind == "notFound"
    assert peers == ["node-b"] and node == "node-a"


async def test_create_list_inspect_and_errors(nursery, pki):
    cl = await start_cluster(nursery, pki)
    with cl.client() as c:
        v = await call(c.create_vm, "vm-1", 2)
        assert (v["name"], v["vcpus"], v["state"], v["features"], v["origin"]) == \
            ("vm-1", 2, "running", ["PSCI_0_2"], "created")
        await call(c.create_vm, "vm-2", 1, ["PSCI_0_2", "PMU_V3"])
        assert [x["name"] for x in await call(c.list_vms)] == ["vm-1", "vm-2"]
        d = await call(c.inspect_vm, "vm-1")
        midr = next(r for r in d["id_registers"] if r["name"] == "MIDR_EL1")
        assert midr["value"].endswith("410fd083") and "Revision=0x3" in midr["fields"]
        assert d["register_count"] > 100
        for args, kind in ((("vm-1", 1), "conflict"), (("bad name!", 1), "badRequest"), (("vm-3", 0), "badRequest"),
                           (("vm-3", 1, ["NOPE"]), "badRequest")):
            with pytest.raises(RpcError) as ei:
                await call(c.create_vm, *args)
            assert ei.value.kind == kind and for_kind(ei.value.kind) == 2
        with pytest.raises(RpcError) as ei:
            await call(c.inspect_vm, "ghost")
        assert ei.value.kind == "notFound" and "ghost" in ei.value.message
        with pytest.raises(RpcError) as ei:
            await call(c.plan, "vm-1", "nowhere")
        assert ei.value.kind == "notFound" and "node-b" in ei.value.message
        assert (await call(c.caps, "node-b"))["profile"] == DST_PROFILE


async def test_plan_and_migrate_via_rpc(nursery, pki):
    cl = await start_cluster(nursery, pki)
    with cl.client() as c, cl.client("b") as cb:
        await call(c.create_vm, "vm-m", 2)
        plan = await call(c.plan, "vm-m", "node-b")
        assert plan["migratable"] and plan["plan"]["enable_cap239"]
        assert {e["register"]: e["verdict"] for e in plan["plan"]["entries"] if not e["field"]}["MIDR_EL1"] == "pin"
        mid = await call(c.migrate, "vm-m", "node-b")
        st = await call(c.wait, mid, 10000)
        assert st["state"] == "committed", st
        assert st["vcpus_done"] == st["vcpus_total"] == 2 and st["registers_sent"] > 100
        assert st["bytes_sent"] > 1000 and st["phase"] == "done" and st["error"] is None
        assert st["plan_digest"] == plan["digest"]          # the plan shown is the plan proposed
        assert (await call(c.inspect_vm, "vm-m"))["state"] == "released"
        dv = await call(cb.inspect_vm, "vm-m")
        assert dv["state"] == "running" and dv["origin"] == "incoming"
        with pytest.raises(RpcError) as ei:                 # released here: cannot migrate again
            await call(c.migrate, "vm-m", "node-b")
        assert ei.value.kind == "conflict"
        assert [m["id"] for m in await call(c.list_migrations)] == [mid]
        assert (await call(c.status, ""))["id"] == mid


async def test_plan_over_peer_link_without_peer_rpc(nursery, pki):
    cl = await start_cluster(nursery, pki, b_rpc=False)
    with cl.client() as c:
        await call(c.create_vm, "vm-p", 1)
        plan = await call(c.plan, "vm-p", "node-b")
        assert plan["migratable"] and plan["plan"]["destination"]


async def test_refused_plan_maps_to_exit_3(nursery, pki):
    cl = await start_cluster(nursery, pki, dst="neoverse-n1@6.1")
    with cl.client() as c:
        await call(c.create_vm, "vm-r", 1)
        plan = await call(c.plan, "vm-r", "node-b")
        assert not plan["migratable"]
        st = await call(c.wait, await call(c.migrate, "vm-r", "node-b"), 10000)
        assert st["state"] == "failed" and st["error"]["kind"] == "refused"
        assert (await call(c.inspect_vm, "vm-r"))["state"] == "running"
        from invariantd.client.ctl import _end_code
        assert _end_code(st) == 3


async def test_unreachable_peer_and_daemon(nursery, pki):
    s = trio.socket.socket()
    await s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    cl = await start_cluster(nursery, pki, extra_peers=(PeerEntry("dead", "127.0.0.1", dead),))
    with cl.client() as c:
        await call(c.create_vm, "vm-u", 1)
        st = await call(c.wait, await call(c.migrate, "vm-u", "dead"), 10000)
        assert st["state"] == "failed" and st["error"]["kind"] == "unreachable"
        from invariantd.client.ctl import _end_code
        assert _end_code(st) == 4
        assert (await call(c.inspect_vm, "vm-u"))["state"] == "running"
    with Client(f"127.0.0.1:{dead}", timeout=5) as c:
        with pytest.raises(RpcError) as ei:
            await call(c.list_vms)
        assert ei.value.kind == "unreachable" and for_kind(ei.value.kind) == 4
    # RPC with mTLS refuses a client without a certificate
    with Client(f"127.0.0.1:{cl.a['rpc']}", client_ssl(None, None, pki["ca"]), server_hostname="localhost",
                timeout=5) as c:
        with pytest.raises(RpcError) as ei:
            await call(c.list_vms)
        assert ei.value.kind == "unreachable"


async def test_cancel_resumes_the_vm(nursery, pki):
    async def stall(stream, who):          # a "peer" that completes TLS and then never answers
        await trio.sleep_forever()
    ctx = tls.server_context(pki["node-b"], None, pki["ca"])
    lst = tls.PeerListener(stall, ctx, "127.0.0.1", 0)
    port = await nursery.start(lst.run)
    cl = await start_cluster(nursery, pki, extra_peers=(PeerEntry("stall", "127.0.0.1", port,
                                                                  server_name="localhost"),), handshake=20)
    with cl.client() as c:
        await call(c.create_vm, "vm-c", 2)
        mid = await call(c.migrate, "vm-c", "stall")
        with trio.fail_after(5):
            while (await call(c.status, mid))["phase"] == "connecting":
                await trio.sleep(0.02)
        assert (await call(c.inspect_vm, "vm-c"))["state"] == "running"       # still in the handshake: not paused yet
        st = await call(c.cancel, mid)
        assert st["state"] == "cancelled" and st["error"]["kind"] == "migrationFailed"
        assert (await call(c.inspect_vm, "vm-c"))["state"] == "running"
        with pytest.raises(RpcError) as ei:
            await call(c.cancel, mid)
        assert ei.value.kind == "conflict"
        with pytest.raises(RpcError) as ei:
            await call(c.status, "nope")
        assert ei.value.kind == "notFound"


async def test_unix_socket_without_tls(nursery, pki, tmp_path):
    path = str(tmp_path / "rpc.sock")
    c0 = replace(cfg("node-a", pki, SRC_PROFILE, rpc_tls=False, unix=path))
    ports = await nursery.start(partial(run, c0, backend=make_backend(c0)))
    assert ports["rpc_unix"] == path
    assert "rpc" not in ports                       # no TCP listener without TLS
    with Client(f"unix:{path}") as c:
        await call(c.create_vm, "u-1", 1)
        assert [v["name"] for v in await call(c.list_vms)] == ["u-1"]
    assert os.stat(path).st_mode & 0o777 == 0o660


def test_config_rpc_and_peers(pki):
    base = f'[backend]\nkind="sim"\nsim_profile="{SRC_PROFILE}"\n[peer]\ncert="{pki["node-a"]}"\nca="{pki["ca"]}"\n'
    c = parse(base + '[rpc]\nport = 7500\n[peers]\nb = "10.0.0.2:7443"\nc = { address = "h:1", rpc = "h:2" }\n')
    assert c.rpc.port == 7500 and not c.rpc.tls
    assert c.find_peer("b").address == "10.0.0.2:7443" and c.find_peer("c").rpc == "h:2"
    for listen in ("0.0.0.0", "127.0.0.1", "::1"):              # TCP is mutual TLS only, loopback included
        with pytest.raises(ConfigError, match=f"rpc.listen = '{listen}' without rpc.tls"):
            parse(base + f'[rpc]\nlisten = "{listen}"\n')
    with pytest.raises(ConfigError, match="neither rpc.listen nor rpc.unix"):
        parse(base + '[rpc]\nunix = ""\n')
    assert (parse(base).rpc.listen, parse(base).rpc.unix) == ("", "/run/invariantd/rpc.sock")
    assert parse(base + '[rpc]\nlisten = "0.0.0.0"\ntls = true\n').rpc.tls
    with pytest.raises(ConfigError, match="peers.b"):
        parse(base + '[peers]\nb = "nohost"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        parse(base + '[peers]\nb = { address = "h:1", x = 1 }\n')


def test_parse_addr():
    assert parse_addr("127.0.0.1:7444") == ("tcp", "127.0.0.1", 7444)
    assert parse_addr("[::1]:9") == ("tcp", "::1", 9)
    assert parse_addr("unix:/run/x.sock") == ("unix", "/run/x.sock", 0)
    assert parse_addr("localhost") == ("tcp", "localhost", 7444)
    with pytest.raises(RpcError):
        parse_addr("h:notaport")


async def test_a_vm_name_the_destination_holds_is_refused_at_plan_time_and_both_daemons_go_on(nursery, pki, caplog):
    """Both daemons hold a VM named "dup": the migration is refused in the plan phase, naming it (before, the
    destination's adopt raised after the stream and took the daemon down with every VM it held); both daemons keep
    serving and a second VM then migrates."""
    caplog.set_level("INFO", logger="invariantd.rpc")
    cl = await start_cluster(nursery, pki)
    a, b = cl.client("a"), cl.client("b")
    try:
        for c in (a, b):
            await call(c.create_vm, "dup", 1)
        mid = await call(a.migrate, "dup", "node-b")
        st = await call(a.wait, mid, 10000)
        assert st["state"] == "failed" and st["error"]["kind"] == "refused", st
        assert "a VM named 'dup' is already held here (running)" in st["error"]["message"]
        assert [v["state"] for v in await call(b.list_vms)] == ["running"]
        assert (await call(a.inspect_vm, "dup"))["state"] == "running"
        await call(a.create_vm, "other", 1)
        st = await call(a.wait, await call(a.migrate, "other", "node-b"), 10000)
        assert st["state"] == "committed", st
        lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "invariantd.rpc"]
        assert any(lv == "WARNING" and "migration outcome aborted migration=" in m and "vm=dup peer=node-b: refused" in m
                   for lv, m in lines), lines
        assert any(lv == "INFO" and f"migration outcome committed migration={st['id']} vm=other peer=node-b" in m
                   for lv, m in lines), lines
    finally:
        a.close()
        b.close()
