"""Two real daemons (server.run, simulated hosts, mutual TLS, RPC) in the test's nursery, and the ways tests talk to
them: the RPC client (call), invariantctl (ctl), /metrics (scrape)."""
from __future__ import annotations

from functools import partial
import trio
from invariantd.client.demo import DST_PROFILE, SRC_PROFILE
from invariantd.daemon.rpcclient import Client, client_ssl
from invariantd.daemon.config import (BackendConfig, Config, MetricsSection, PeerEntry, PeerSection,
                                      RpcSection, Timeouts)
from invariantd.daemon.server import make_backend, run
from invariantd.client.cli import main
from prometheus_client.parser import text_string_to_metric_families


def cfg(node, pki, profile, peers=(), rpc_tls=True, handshake=5.0, unix=""):
    return Config(node=node, log_level="warning", backend=BackendConfig(kind="sim", sim_profile=profile),
                  peer=PeerSection(port=0, cert=pki[node], ca=pki["ca"]), metrics=MetricsSection(port=0),
                  timeouts=Timeouts(handshake=handshake, phase=5, apply=5, commit=5, drain=2),
                  rpc=RpcSection(listen="127.0.0.1" if rpc_tls else "", port=0, tls=rpc_tls, unix=unix), peers=tuple(peers))


class Cluster:
    """node-a (source) and node-b (destination) daemons; a's peers: b, plus extra entries."""

    def __init__(self, pki, ports_a, ports_b):
        self.pki, self.a, self.b = pki, ports_a, ports_b

    def client(self, which="a", **kw) -> Client:
        port = (self.a if which == "a" else self.b)["rpc"]
        return Client(f"127.0.0.1:{port}", client_ssl(self.pki["operator"], None, self.pki["ca"]),
                      server_hostname="localhost", **kw)


async def start_cluster(nursery, pki, dst=DST_PROFILE, extra_peers=(), handshake=5.0, b_rpc=True):
    cb = cfg("node-b", pki, dst)
    pb = await nursery.start(partial(run, cb, backend=make_backend(cb)))
    peers = (PeerEntry("node-b", "127.0.0.1", pb["peer"], rpc=f"127.0.0.1:{pb['rpc']}" if b_rpc else "",
                       server_name="localhost"), *extra_peers)
    ca = cfg("node-a", pki, SRC_PROFILE, peers, handshake=handshake)
    pa = await nursery.start(partial(run, ca, backend=make_backend(ca)))
    return Cluster(pki, pa, pb)


def call(fn, *a):
    return trio.to_thread.run_sync(lambda: fn(*a))


def ctl(cl, *argv, daemon="a"):
    port = (cl.a if daemon == "a" else cl.b)["rpc"]
    args = [*argv, "--daemon", f"127.0.0.1:{port}", "--ca", cl.pki["ca"], "--cert", cl.pki["operator"],
            "--server-name", "localhost"]
    return trio.to_thread.run_sync(main, args)


async def scrape(port: int, path: str = "/metrics", accept: str | None = None) -> tuple[str, dict, bytes]:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    req = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + (f"Accept: {accept}\r\n" if accept else "") + "\r\n"
    await s.send_all(req.encode())
    data = b""
    with trio.fail_after(5):
        while chunk := await s.receive_some(65536):
            data += chunk
    await s.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return lines[0], headers, body


def by_name(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}
