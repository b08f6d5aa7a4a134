"""etcd publishing against Debian's real etcd server on loopback: the capability document and a summary under a lease,
gone when the daemon stops (revoked) - and a daemon whose etcd is away starts and serves anyway."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from functools import partial

import pytest
import trio

from invariantd.daemon.config import EtcdSection
from invariantd.daemon.server import make_backend, run
from support.cluster import cfg

pytestmark = pytest.mark.skipif(not shutil.which("etcd"), reason="needs Debian's etcd-server (the README's test "
                                                                  "command installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    d = tmp_path_factory.mktemp("etcd")
    client, peer = free_port(), free_port()
    proc = subprocess.Popen(["etcd", "--data-dir", str(d / "data"), "--name", "t",
                             "--listen-client-urls", f"http://127.0.0.1:{client}",
                             "--advertise-client-urls", f"http://127.0.0.1:{client}",
                             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                             "--initial-cluster", f"t=http://127.0.0.1:{peer}"],
                            stdout=subprocess.DEVNULL, stderr=open(d / "log", "w"))
    import etcd3gw
    c = etcd3gw.client(host="127.0.0.1", port=client)
    for _ in range(100):
        try:
            c.status()
            break
        except Exception:
            time.sleep(0.1)
    yield f"127.0.0.1:{client}", c
    proc.terminate()
    proc.wait(10)


def read(c, key):
    got = c.get(key)
    return json.loads(got[0]) if got else None


async def test_caps_and_summary_under_a_lease_gone_when_the_daemon_stops(pki, etcd):
    endpoint, c = etcd
    conf = replace(cfg("node-a", pki, "cortex-a72-r0p4@7.3"), etcd=EtcdSection(endpoint, "/fleet", 10.0))
    async with trio.open_nursery() as n:
        ports = await n.start(partial(run, conf, backend=make_backend(conf)))
        assert ports["etcd"] == "/fleet/hosts/node-a"
        caps, summ = await trio.to_thread.run_sync(lambda: (read(c, "/fleet/hosts/node-a/caps"),
                                                            read(c, "/fleet/hosts/node-a/summary")))
        assert caps["profile"] == "cortex-a72-r0p4@7.3" and caps["kernel_version"] == "7.3" and caps["values"]
        assert summ == {"node": "node-a", "profile": "cortex-a72-r0p4@7.3", "arch": "aarch64", "kernel": "7.3",
                        "midr": "0x410fd084", "cap239": True, "peer": f"127.0.0.1:{ports['peer']}"}
        leases = await trio.to_thread.run_sync(lambda: c.get("/fleet/hosts/node-a/caps", metadata=True))
        assert int(leases[0][1]["lease"]) != 0                           # under a lease: it dies with the daemon
        n.cancel_scope.cancel()
    gone = await trio.to_thread.run_sync(lambda: c.get_prefix("/fleet/hosts/node-a/"))
    assert gone == []                                                    # revoked at stop: gone at once


async def test_an_unreachable_etcd_does_not_stop_the_daemon(pki, caplog):
    conf = replace(cfg("node-a", pki, "cortex-a72-r0p4@7.3"), etcd=EtcdSection(f"127.0.0.1:{free_port()}", ttl=3.0))
    async with trio.open_nursery() as n:
        ports = await n.start(partial(run, conf, backend=make_backend(conf)))
        assert ports["peer"]
        n.cancel_scope.cancel()
    assert "retrying in" in caplog.text
