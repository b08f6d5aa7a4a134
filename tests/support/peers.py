"""Peer-protocol test nodes (a daemon's peer code without the RPC: Node), streams that record or cut a connection,
and a session pair brought to READY."""
from __future__ import annotations

import trio
from support.fixtures import Passthrough, synthetic_doc
from invariantd.daemon import tls
from invariantd.daemon.metrics import Metrics
from invariantd.daemon.peer import PeerConfig, handle_incoming
from invariantd.daemon.probe import probe
from invariantd.daemon.sim.host import SimHost, eras
from invariantd.daemon.vms import VmRegistry
from invariantd.protocol import session as ps
from invariantd.protocol.framing import FrameDecoder
from invariantd.protocol.session import (Capabilities, Hello, PlanAccept, PlanProposal, Preflight,
                                         Session)

S, D = ps.SOURCE, ps.DESTINATION
CFG = PeerConfig(chunk_registers=32, handshake_timeout=5, phase_timeout=5, apply_timeout=5, commit_timeout=5)


class Node:
    def __init__(self, host: SimHost, pki, name="node-b", ca="ca", cfg=CFG):
        self.host, self.registry, self.metrics, self.cfg = host, VmRegistry(host), Metrics(), cfg
        self.server_ctx = tls.server_context(pki[name], None, pki[ca])
        self.client_ctx = tls.client_context(pki[name], None, pki[ca])
        self.results: list = []
        self.done = trio.Event()
        self.caps = probe(host)

    async def handler(self, stream, peer):
        try:
            self.results.append(await handle_incoming(stream, peer, backend=self.host, registry=self.registry,
                                                      caps_doc=self.caps, cfg=self.cfg, metrics=self.metrics))
        finally:
            self.done.set()

    async def listen(self, nursery, **kw) -> tuple[tls.PeerListener, int]:
        lst = tls.PeerListener(self.handler, self.server_ctx, "127.0.0.1", 0, handshake_timeout=5, **kw)
        port = await nursery.start(lst.run)
        return lst, port


def sim(kernel="6.12", era=None, **kw) -> SimHost:
    return SimHost(doc=synthetic_doc(kernel, **kw), era=eras()[era] if era else None)


def source(pki, host=None, vcpus=2) -> Node:
    n = Node(host or sim(), pki, "node-a")
    n.registry.create("vm-1", vcpus)
    return n


class CutAfter(Passthrough, trio.abc.Stream):
    """Passes messages through; the n-th send is cut in the middle of its frame and the connection dropped."""

    def __init__(self, inner, n):
        self.inner, self.n, self.sends = inner, n, 0

    async def send_all(self, data):
        self.sends += 1
        if self.sends == self.n:
            await self.inner.send_all(data[: len(data) // 2])
            await trio.aclose_forcefully(self.inner)
            raise trio.BrokenResourceError("cut by test")
        await self.inner.send_all(data)


class Recording(Passthrough, trio.abc.Stream):
    """Passes everything through and decodes what the source sends (to prove what did / did not move)."""

    def __init__(self, inner):
        self.inner, self.dec, self.sent = inner, FrameDecoder(), []

    async def send_all(self, data):
        self.dec.feed(data)
        while (f := self.dec.next_frame()) is not None:
            self.sent.append(type(ps.decode(f)).__name__)
        await self.inner.send_all(data)


def pair_at_ready(src_versions=(1, 2), dst_versions=(1, 2), vcpus=4):
    s, d = Session(S, versions=src_versions), Session(D, versions=dst_versions)

    def xfer(a, b, ev):
        b.receive_data(a.send(ev))
        got = b.next_event()
        assert got == ev
    xfer(s, d, Hello(src_versions, S, "a"))
    xfer(d, s, Hello(dst_versions, D, "b"))
    xfer(d, s, Capabilities("x", b""))
    prop = PlanProposal("m", "vm", vcpus, "f", b"p")
    xfer(s, d, prop)
    xfer(d, s, PlanAccept("m", prop.digest))
    xfer(d, s, Preflight(True))
    return s, d
