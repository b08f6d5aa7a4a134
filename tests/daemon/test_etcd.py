"""etcd publishing against Debian's real etcd server on loopback: the capability document and a summary under a lease,
gone when the daemon stops (revoked) - and a daemon whose etcd is away starts and serves anyway."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from functools import partial

import pytest
import trio

from invariantd.daemon.config import EtcdSection
from invariantd.daemon.server import make_backend, run
from invariantd.daemon.fleet import doc_digest
from support.cluster import cfg
from support.etcd import etcd_server, free_port

pytestmark = pytest.mark.skipif(not shutil.which("etcd"), reason="needs Debian's etcd-server (the README's test "
                                                                  "command installs it)")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    with etcd_server(tmp_path_factory.mktemp("etcd")) as e:
        yield e


def read(c, key):
    got = c.get(key)
    return json.loads(got[0]) if got else None


async def test_caps_and_summary_under_a_lease_gone_when_the_daemon_stops(pki, etcd):
    endpoint, c = etcd
    conf = replace(cfg("node-a", pki, "cortex-a72-r0p4@7.3"), etcd=EtcdSection(endpoint, "/fleet", 10.0))
    async with trio.open_nursery() as n:
        ports = await n.start(partial(run, conf, backend=make_backend(conf)))
        assert ports["etcd"] == "/fleet/hosts/node-a"
        summ = await trio.to_thread.run_sync(read, c, "/fleet/hosts/node-a")
        assert summ["caps"] and summ == {"node": "node-a", "profile": "cortex-a72-r0p4@7.3", "arch": "aarch64",
                                         "kernel": "7.3", "midr": "0x410fd084", "cap239": True,
                                         "peer": f"127.0.0.1:{ports['peer']}", "caps": summ["caps"]}
        caps = await trio.to_thread.run_sync(read, c, f"/fleet/caps/{summ['caps']}")
        assert caps["profile"] == "cortex-a72-r0p4@7.3" and caps["kernel_version"] == "7.3" and caps["values"]
        assert doc_digest(caps) == summ["caps"]                          # content-addressed
        for key in ("/fleet/hosts/node-a", f"/fleet/caps/{summ['caps']}"):
            meta = await trio.to_thread.run_sync(lambda: c.get(key, metadata=True))
            assert int(meta[0][1]["lease"]) != 0                         # under a lease: it dies with the daemon
        n.cancel_scope.cancel()
    gone = await trio.to_thread.run_sync(lambda: c.get_prefix("/fleet/"))
    assert gone == []                                                    # revoked at stop: gone at once


async def test_hosts_of_one_shape_share_one_document_which_outlives_its_first_owner(pki, etcd):
    endpoint, c = etcd
    confs = [replace(cfg(node, pki, "cortex-a72-r0p4@7.3"), etcd=EtcdSection(endpoint, "/shared", 3.0))
             for node in ("node-a", "node-b")]
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as first:
            await first.start(partial(run, confs[0], backend=make_backend(confs[0])))
            await outer.start(partial(run, confs[1], backend=make_backend(confs[1])))
            got = await trio.to_thread.run_sync(lambda: c.get_prefix("/shared/caps/"))
            assert len(got) == 1                                         # one document for two hosts
            first.cancel_scope.cancel()                                  # its creator stops: its lease is revoked
        with trio.fail_after(5):                                         # node-b stores it again within ttl/3
            while not await trio.to_thread.run_sync(lambda: c.get_prefix("/shared/caps/")):
                await trio.sleep(0.1)
        hosts = await trio.to_thread.run_sync(lambda: c.get_prefix("/shared/hosts/"))
        assert [json.loads(v)["node"] for v, _ in hosts] == ["node-b"]
        outer.cancel_scope.cancel()


async def test_an_unreachable_etcd_does_not_stop_the_daemon(pki, caplog):
    conf = replace(cfg("node-a", pki, "cortex-a72-r0p4@7.3"), etcd=EtcdSection(f"127.0.0.1:{free_port()}", ttl=3.0))
    async with trio.open_nursery() as n:
        ports = await n.start(partial(run, conf, backend=make_backend(conf)))
        assert ports["peer"]
        n.cancel_scope.cancel()
    assert "retrying in" in caplog.text
