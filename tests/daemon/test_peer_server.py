"""daemon/server.py + config.py: the whole daemon in one root nursery (sim backend), sd_notify, SIGTERM drain."""
from __future__ import annotations

import os
import signal
import socket
from functools import partial

import pytest
import trio

from support.fixtures import synthetic_doc
from invariantd.daemon import tls
from invariantd.daemon.config import ConfigError, parse
from invariantd.daemon.peer import migrate_out
from invariantd.daemon.server import run
from invariantd.daemon.sim.host import SimHost
from invariantd.daemon.vms import VmRegistry, VmState
from support.cluster import by_name, scrape
from support.peers import CFG


def config(pki, **peer):
    text = f'''
node = "b"
[backend]
kind = "sim"
sim_profile = "synthetic@6.12"
[peer]
port = 0
cert = "{pki['node-b']}"
ca = "{pki['ca']}"
[metrics]
port = 0
[rpc]
enabled = false
[timeouts]
drain = 5
'''
    return parse(text, "test.toml")


def test_config_errors_are_named(pki):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) prot"):
        parse('[peer]\nprot = 1\ncert="a"\nca="b"', "x.toml")
    with pytest.raises(ConfigError, match="peer.cert and peer.ca are required"):
        parse('[backend]\nkind="kvm"', "x.toml")
    with pytest.raises(ConfigError, match="timeouts.apply: expected a positive, finite number"):
        parse('[backend]\nkind="kvm"\n[peer]\ncert="a"\nca="b"\n[timeouts]\napply="x"', "x.toml")
    with pytest.raises(ConfigError, match="peer.checksum must be one of crc32, sha256, xxh3, not 'md5'"):
        parse('[backend]\nkind="kvm"\n[peer]\ncert="a"\nca="b"\nchecksum="md5"', "x.toml")
    assert config(pki).peer.port == 0 and config(pki).peer.checksum == "xxh3"


async def test_daemon_serves_notifies_and_drains(pki, tmp_path, monkeypatch):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    cfg = config(pki)
    dest = SimHost(doc=synthetic_doc("6.12"))
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            ports = await n.start(partial(run, cfg, backend=dest))
            await trio.sleep(0.05)
            msgs = []
            while True:
                try:
                    msgs.append(sock.recv(4096).decode())
                except BlockingIOError:
                    break
            assert any(m.startswith("READY=1") for m in msgs) and "WATCHDOG=1" in msgs
            src = VmRegistry(SimHost(doc=synthetic_doc("6.12")))
            src.create("vm-9", 1)
            ctx = tls.client_context(pki["node-a"], None, pki["ca"])
            stream = await tls.connect("127.0.0.1", ports["peer"], ctx, server_hostname="localhost")
            res = await migrate_out(stream, src, "vm-9", cfg=CFG)
            assert res.result == "committed" and src.get("vm-9").state is VmState.RELEASED
            await trio.sleep(0.05)
            _, _, body = await scrape(ports["metrics"])
            fams = by_name(body.decode())
            assert any(s.labels.get("result") == "committed" and s.value == 1
                       for s in fams["invariantd_migrations"].samples)
            os.kill(os.getpid(), signal.SIGTERM)
    rest = []
    while True:
        try:
            rest.append(sock.recv(4096).decode())
        except BlockingIOError:
            break
    assert "STOPPING=1" in rest
    sock.close()
