"""A QEMU migration through two in-process daemons (simulated hosts, mutual TLS on the peer link and the RPC), with
stand-ins for the QEMU processes: a fake agent on each daemon's agent socket (the wire format of agent.c) and a
fake QMP server per QEMU. What crosses the RPC: migrateVmm, the peer's prepareVmm / incomingVmm / vmmStatus, the
program the destination agent receives, the record the source keeps. The real processes: tests/lab/."""
from __future__ import annotations

import json
from functools import partial

import trio

from support.fixtures import FakeQemu
from invariantd.client.cli import main
from invariantd.daemon.pki import make_pki
from invariantd.daemon.rpcclient import Client, client_ssl
from invariantd.daemon.readback import read_vm
from invariantd.daemon.config import AgentSection, BackendConfig, Config, MetricsSection, PeerEntry, PeerSection, \
    RpcSection, Timeouts
from invariantd.daemon.server import make_backend, run
from invariantd.daemon.sim.host import SimHost
from invariantd.protocol import agentwire as W
from invariantd.protocol.program import ApplyProgram

SRC, DST = "cortex-a72-r0p3@7.3", "cortex-a72-r0p4@7.3"


def cfg(node, pki, profile, sock, peers=()):
    return Config(node=node, log_level="warning", backend=BackendConfig(kind="sim", sim_profile=profile),
                  peer=PeerSection(port=0, cert=pki[node], ca=pki["ca"]), metrics=MetricsSection(port=0),
                  timeouts=Timeouts(handshake=5, phase=5, apply=10, commit=10, drain=2),
                  rpc=RpcSection(listen="127.0.0.1", port=0, tls=True, unix=""), agent=AgentSection(socket=sock, hold=10), peers=tuple(peers))


async def agent(path, hello, frames=(), *, answer=None):
    """A fake agent: HELLO, then `frames`; answer(program bytes) -> more frames, sent when the program arrives."""
    s = await trio.open_unix_socket(path)
    await s.send_all(W.encode_hello(hello) + b"".join(frames))
    if answer is not None:
        r, got = W.Reader(), []
        while not got:
            got = r.feed(await s.receive_some(65536))
        await s.send_all(b"".join(answer(got[0])))
    return s


def ctl(ports, pki, *argv):
    args = [*argv, "--daemon", f"127.0.0.1:{ports['rpc']}", "--ca", pki["ca"], "--cert", pki["operator"],
            "--server-name", "localhost"]
    return trio.to_thread.run_sync(main, args)


async def test_migrate_vmm_over_the_rpc_commits_with_the_destination_agent(nursery, tmp_path, capsys):
    pki = make_pki(tmp_path)
    sa, sb = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    cb = cfg("node-b", pki, DST, sb)
    pb = await nursery.start(partial(run, cb, backend=make_backend(cb)))
    peers = (PeerEntry("node-b", "127.0.0.1", pb["peer"], rpc=f"127.0.0.1:{pb['rpc']}", server_name="localhost"),)
    ca = cfg("node-a", pki, SRC, sa, peers)
    pa = await nursery.start(partial(run, ca, backend=make_backend(ca)))
    src_q, dst_q = FakeQemu(str(tmp_path / "src.qmp")), FakeQemu(str(tmp_path / "dst.qmp"), states=("active",))

    h = SimHost(SRC)                                  # what the source QEMU's vCPU 0 shows its agent
    v = h.create_vm().create_vcpu(0)
    v.init(h.init)
    regs = read_vm({0: v})[0]
    ids_like = [(r, x) for r, x in regs if r >> 16 & 0xfff in (0x13, 0x14, 0x16)]
    src_agent = await agent(sa, W.Hello(1, W.Role.SOURCE, "web-1", ""),
                            [W.encode_snapshot(W.Snapshot(0, tuple(r for r, _ in regs), tuple(ids_like), 1 << 2))])
    programs = []

    def applied(prog: bytes):
        p = ApplyProgram.decode(prog)
        programs.append(p)
        return [W.encode_verify(W.Verify(0, len(p.ops), 1, ())), W.encode_verify(W.Verify(0, len(p.ops), 2, ()))]

    client = Client(f"127.0.0.1:{pa['rpc']}", client_ssl(pki["operator"], None, pki["ca"]), server_hostname="localhost")
    try:
        async with trio.open_nursery() as n:
            async def dest_agent():      # the orchestrator started the destination QEMU first: it waits for the plan
                nonlocal dst_agent
                dst_agent = await agent(sb, W.Hello(2, W.Role.DESTINATION, "web-1", ""), answer=applied)
            dst_agent = None
            n.start_soon(dest_agent)
            vmms = await trio.to_thread.run_sync(client.list_vmms)
            assert [(x["role"], x["vm"], x["vcpus_snapshotted"]) for x in vmms] == [("source", "web-1", [0])]
            mid = await trio.to_thread.run_sync(client.migrate_vmm, "web-1", "node-b", src_q.path, "tcp:127.0.0.1:1",
                                                dst_q.path)
            st = await trio.to_thread.run_sync(client.wait, mid, 20000)
        assert st["state"] == "committed", st
        assert src_q.names() == ["migrate-set-capabilities", "migrate", "migrate-continue", "quit"]
        assert dst_q.names() == ["migrate-set-capabilities", "migrate-incoming"]
        assert dst_q.cmds[1][1] == {"uri": "tcp:0.0.0.0:1"}
        [p] = programs
        assert p.enable_cap239 and p.digest.hex() == st["plan_digest"] and p.migration == mid
        dest = st["detail"]["destination"]
        assert dest["applied"] and dest["running"] and dest["agent"]["migration"] == mid
        # the CLI on top: the agents seen, and a VM no agent reported is refused up front (exit 2)
        assert await ctl(pa, pki, "vmms", "--json") == 0
        assert [x["vm"] for x in json.loads(capsys.readouterr().out)] == ["web-1"]
        assert await ctl(pa, pki, "migrate-vmm", "web-2", "--to", "node-b", "--qmp", src_q.path, "--uri", "tcp:x:1") == 2
        assert "no VMM agent reported a VM named 'web-2'" in capsys.readouterr().err
    finally:
        client.close()
        await src_agent.aclose()
        if dst_agent is not None:
            await dst_agent.aclose()
