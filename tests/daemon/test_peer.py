"""End to end on loopback: two daemons' peer code over mutual TLS (trustme CA), simulated arm64 hosts."""
from __future__ import annotations

from dataclasses import replace

import struct

import pytest
import trio

from support.fixtures import Passthrough, synthetic_doc
from invariantd.daemon import tls
from invariantd.daemon.pki import make_pki
from invariantd.daemon.metrics import Metrics
from invariantd.daemon.peer import PeerConfig, PeerError, handle_incoming, migrate_out
from invariantd.daemon.probe import probe
from invariantd.daemon.sim.host import SimHost, eras
from invariantd.daemon.vms import VmRegistry, VmState
from invariantd.protocol import session as ps
from invariantd.protocol.catalog import catalog
from invariantd.protocol.schemas import Verdict
from support.peers import CFG, CutAfter, Node, pair_at_ready, sim, source


MIDR = catalog().id_of("MIDR_EL1")










async def test_identical_hosts_commit(nursery, pki):
    a, b = source(pki), Node(sim(), pki)
    lst, port = await b.listen(nursery)
    stream = await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost")
    src = a.registry.get("vm-1").vcpus[1]
    ids = src.reg_list()
    src_regs = src.get_regs(ids)[0].as_dict()
    res = await migrate_out(stream, a.registry, "vm-1", cfg=CFG, metrics=a.metrics)
    await stream.aclose()
    with trio.fail_after(5):
        await b.done.wait()
    assert res.result == "committed" and a.registry.get("vm-1").state is VmState.RELEASED
    assert a.registry.get("vm-1").freed and a.registry.get("vm-1").vcpus == {}     # acknowledged: its state went
    [r] = b.results
    assert r.result == "committed" and r.digest == res.digest
    vm_b = b.registry.get("vm-1")
    assert vm_b.state is VmState.RUNNING and sorted(vm_b.vcpus) == [0, 1]
    dst = vm_b.vcpus[1]
    assert {r: dst.get_reg(r) for r in src_regs} == src_regs
    assert b.metrics.migrations.labels("committed")._value.get() == 1
    assert a.metrics.stream_bytes.labels("sent")._value.get() > 0


@pytest.mark.parametrize("dest_versions, want", [((1, 2, 3), "xxh3"), ((1, 2), "crc32"), ((1,), "crc32")])
async def test_checksum_follows_the_common_protocol(nursery, pki, dest_versions, want):
    """xxh3 chunks (protocol 3) by default; a destination pinned to an older protocol gets crc32 chunks."""
    a, b = source(pki), Node(sim(), pki, cfg=replace(CFG, versions=dest_versions))
    _, port = await b.listen(nursery)
    stream = await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost")
    sent = []
    res = await migrate_out(stream, a.registry, "vm-1", cfg=replace(CFG, chunk_registers=4096),
                            on_event=lambda d, ev: sent.append(ev) if isinstance(ev, ps.VcpuChunk) else None)
    with trio.fail_after(5):
        await b.done.wait()
    assert res.result == "committed" and b.results[0].digest == res.digest
    assert sent and {c.checksum_kind for c in sent} == {want}
    assert {c.count > 0 for c in sent} == {len(dest_versions) > 1}      # multi-vCPU chunks from protocol 2


async def test_midr_override_across_revisions(nursery, pki):
    """The engine plans the MIDR override (same part, next revision); the patched destination would refuse the
    source MIDR with EINVARIANT, the apply writes the plan's value directly."""
    a = source(pki, sim("6.1", midr=0x410FD083))
    b = Node(sim("6.1", era="patched", midr=0x410FD084), pki)
    _, port = await b.listen(nursery)
    stream = await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost")
    res = await migrate_out(stream, a.registry, "vm-1", cfg=CFG)
    with trio.fail_after(5):
        await b.done.wait()
    assert res.result == "committed"
    [r] = b.results
    assert {(e.register, e.errno, e.action) for e in r.events} == {("MIDR_EL1", "-", "override-plan")}
    assert b.registry.get("vm-1").vcpus[0].get_reg(MIDR) == 0x410FD084
    assert b.metrics.invariant_overrides.labels("MIDR_EL1", "override-plan")._value.get() == 2


async def test_preflight_refusal_resumes_source(nursery, pki):
    """Stale capabilities: the destination advertises r0p3 (what it was probed as) but its kernel now holds
    r0p4. The plan says 'identical', the trial apply on the scratch vCPU meets EINVARIANT with no override
    allowed: pre-flight fails, the source resumes, nothing moves."""
    a = source(pki, sim("6.1", midr=0x410FD083))
    b = Node(sim("6.1", era="patched", midr=0x410FD084), pki)
    b.caps = probe(sim("6.1", era="patched", midr=0x410FD083))
    _, port = await b.listen(nursery)
    stream = await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost")
    with pytest.raises(PeerError) as ei:
        await migrate_out(stream, a.registry, "vm-1", cfg=CFG)
    with trio.fail_after(5):
        await b.done.wait()
    assert ei.value.kind == "preflight" and "MIDR_EL1" in str(ei.value) and "EINVARIANT" in str(ei.value)
    assert a.registry.get("vm-1").state is VmState.RUNNING and b.registry.vms == {} and b.results == [None]




async def test_cut_mid_stream_source_resumes_destination_discards(nursery, pki):
    a, b = source(pki), Node(sim(), pki)
    _, port = await b.listen(nursery)
    stream = await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost")
    with pytest.raises(PeerError) as ei:
        # sends: Hello, PlanProposal, chunks 0-2, then chunk 3 is cut half-way
        await migrate_out(CutAfter(stream, 6), a.registry, "vm-1", cfg=replace(CFG, send_batch_bytes=1), metrics=a.metrics)
    with trio.fail_after(5):
        await b.done.wait()
    assert ei.value.kind == "closed"
    assert a.registry.get("vm-1").state is VmState.RUNNING             # resumed, intact
    assert a.registry.get("vm-1").history == ["running->paused", "paused->running"]
    assert b.results == [None] and b.registry.vms == {}                 # nothing half-applied kept
    assert b.metrics.migrations.labels("aborted")._value.get() == 1


async def test_client_cert_from_wrong_ca_refused(nursery, pki):
    a = source(pki)
    rogue_ctx = tls.client_context(pki["rogue"], None, pki["ca"])      # trusts our CA, but its cert is not ours
    b = Node(sim(), pki)
    lst, port = await b.listen(nursery)
    with pytest.raises((tls.TlsError, PeerError)):
        stream = await tls.connect("127.0.0.1", port, rogue_ctx, server_hostname="localhost")
        await migrate_out(stream, a.registry, "vm-1", cfg=CFG)
    with trio.fail_after(5):
        while not lst.refused:
            await trio.sleep(0.01)
    assert "TLS handshake failed" in lst.refused[0]
    assert a.registry.get("vm-1").state is VmState.RUNNING and b.results == []


async def test_server_cert_from_wrong_ca_refused(nursery, pki):
    a = source(pki)
    rogue = Node(sim(), pki, "rogue", "other-ca")
    _, port = await rogue.listen(nursery)
    with pytest.raises(tls.TlsError, match="certificate verify failed|CERTIFICATE_VERIFY_FAILED"):
        await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost")


async def test_allowed_peers_enforced(nursery, pki):
    b = Node(sim(), pki)
    lst, port = await b.listen(nursery, allowed_peers=frozenset({"node-z"}))
    a = source(pki)
    stream = await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost")
    with pytest.raises(PeerError):
        await migrate_out(stream, a.registry, "vm-1", cfg=CFG)
    assert "'node-a' is not an allowed peer" in lst.refused[0]
    assert a.registry.get("vm-1").state is VmState.RUNNING


async def _raw_exchange(port, pki, payload: bytes) -> ps.Abort:
    ctx = tls.client_context(pki["node-a"], None, pki["ca"])
    s = await tls.connect("127.0.0.1", port, ctx, server_hostname="localhost")
    await s.send_all(payload)
    data = b""
    with trio.fail_after(5):
        try:
            while chunk := await s.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass
    frames, rest = [], data
    from invariantd.protocol.framing import FrameDecoder
    dec = FrameDecoder()
    dec.feed(rest)
    while (f := dec.next_frame()) is not None:
        frames.append(ps.decode(f))
    return frames[-1]


async def test_malformed_frame_refused_with_clear_error(nursery, pki):
    b = Node(sim(), pki)
    _, port = await b.listen(nursery)
    ab = await _raw_exchange(port, pki, struct.pack("<II", 0, 2) + b"\xff" * 16)
    with trio.fail_after(5):
        await b.done.wait()
    assert isinstance(ab, ps.Abort) and ab.code == "protocol" and "undecodable" in ab.reason
    assert b.results == [None]


async def test_oversized_frame_refused_with_clear_error(nursery, pki):
    b = Node(sim(), pki)
    _, port = await b.listen(nursery)
    ab = await _raw_exchange(port, pki, struct.pack("<II", 0, 1 << 28))      # announces a 2 GiB segment
    assert ab.code == "protocol" and "frame-too-large" in ab.reason and "the limit is" in ab.reason
    ab = await _raw_exchange(port, pki, struct.pack("<I", 4000))
    assert "too-many-segments" in ab.reason


class _Writes(trio.abc.Stream):
    def __init__(self):
        self.writes: list[bytes] = []

    async def send_all(self, data):
        self.writes.append(bytes(data))

    async def wait_send_all_might_not_block(self):
        pass

    async def receive_some(self, max_bytes=None):
        return b""

    async def aclose(self):
        pass


async def test_prepared_stream_is_written_in_whole_tls_records():
    """The stream goes out in record-aligned writes (no short TLS record mid-stream), the first one smaller;
    the bytes are exactly the events' encodings back to back; a receiver decodes every event."""
    from invariantd.daemon.peer import TLS_RECORD, Conn
    s, d = pair_at_ready((3,), (3,), vcpus=4)
    z = [0x6080000000150000 + k for k in range(40)]                 # U2048 ids: 10 KiB per vCPU
    chunks = [ps.VcpuChunk.build_multi("vm", 0, i, z, [[i * k << 2000 for k in range(40)]] * 4, "xxh3")
              for i in range(16)]
    out = _Writes()
    told = []
    conn = Conn(out, s, None, lambda d, ev: told.append((len(out.writes), ev)))
    await conn.send_prepared(conn.prepare(chunks), 8 * TLS_RECORD, None, 2 * TLS_RECORD)
    sizes = [len(w) for w in out.writes]
    assert sizes[0] == 2 * TLS_RECORD and all(n == 8 * TLS_RECORD for n in sizes[1:-1])
    assert 0 < sizes[-1] <= 8 * TLS_RECORD
    wire = b"".join(out.writes)
    assert wire == b"".join(ps.encode(c) for c in chunks)
    d.receive_data(wire)
    got = []
    while (ev := d.next_event()) is not ps.NEED_DATA:
        got.append(ev)
    assert got == chunks
    # progress: each event is told just before the write that carries its first byte
    offsets = [0]
    for c in chunks:
        offsets.append(offsets[-1] + len(ps.encode(c)))
    ends = [sum(sizes[:k + 1]) for k in range(len(sizes))]
    assert [ev for _, ev in told] == chunks
    assert [w for w, _ in told] == [next(k for k, e in enumerate(ends) if e > off) for off in offsets[:-1]]
    # below a record, every event is its own write (what the cut-mid-stream tests rely on)
    s2, _ = pair_at_ready((3,), (3,), vcpus=4)
    out2 = _Writes()
    conn2 = Conn(out2, s2, None)
    await conn2.send_prepared(conn2.prepare(chunks), 1)
    assert [len(w) for w in out2.writes] == [len(ps.encode(c)) for c in chunks]


class _PerWrite(Passthrough, trio.abc.Stream):
    """Passes through; notes, per write, its size and the frames it completes."""

    def __init__(self, inner):
        from invariantd.protocol.framing import FrameDecoder
        super().__init__(inner)
        self.dec, self.writes = FrameDecoder(), []

    async def send_all(self, data):
        self.dec.feed(data)
        done = []
        while (f := self.dec.next_frame()) is not None:
            done.append(type(ps.decode(f)).__name__)
        self.writes.append((len(data), done))
        await self.inner.send_all(data)


async def test_stream_goes_out_as_whole_records_with_its_stream_end(nursery, pki):
    """The source writes the chunks and their StreamEnd as one byte stream: whole TLS records, the StreamEnd in
    the same write as the end of the last chunk (no extra round of write / wake-up for it)."""
    from invariantd.daemon.peer import TLS_RECORD
    a, b = source(pki, vcpus=96), Node(sim(), pki)
    _, port = await b.listen(nursery)
    stream = _PerWrite(await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost"))
    cfg = replace(CFG, chunk_registers=4096, chunk_bytes=8 * 1024, send_batch_bytes=2 * TLS_RECORD,
                  first_batch_bytes=TLS_RECORD)
    res = await migrate_out(stream, a.registry, "vm-1", cfg=cfg)
    with trio.fail_after(5):
        await b.done.wait()
    assert res.result == "committed"
    first = next(i for i, (_, done) in enumerate(stream.writes) if "VcpuChunk" in done)
    last = next(i for i, (_, done) in enumerate(stream.writes) if "StreamEnd" in done)
    sizes = [n for n, _ in stream.writes[first:last + 1]]
    assert len(sizes) >= 3 and sizes[0] == TLS_RECORD and set(sizes[1:-1]) == {2 * TLS_RECORD}
    assert "VcpuChunk" in stream.writes[last][1]             # the last chunk ends in the StreamEnd's write
    assert sum(d.count("VcpuChunk") for _, d in stream.writes) > 3


async def _sve_migration(nursery, pki, src_spec, dst_spec):
    from invariantd.daemon.kvm.backend import VcpuInit
    from invariantd.protocol import kvmabi, regid
    a, b = Node(SimHost(src_spec), pki, "node-a"), Node(SimHost(dst_spec), pki)
    init = VcpuInit(a.host.init.target, (kvmabi.VCPU_FEATURES["PSCI_0_2"], kvmabi.VCPU_FEATURES["SVE"]))
    mvm = a.registry.create("vm-1", 2, init)                # finalized at the host's lengths
    z3 = regid.sve_z(3)
    for i, v in mvm.vcpus.items():
        v.set_reg(z3, (0x5A5A << (16 * i)) | 1)
    _, port = await b.listen(nursery)
    stream = await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost")
    plans = []
    try:
        res = await migrate_out(stream, a.registry, "vm-1", cfg=replace(CFG, chunk_registers=4096),
                                on_plan=plans.append)
    except PeerError as e:
        res = e
    with trio.fail_after(5):
        await b.done.wait()
    return a, b, res, plans[0], z3


async def test_sve_vm_created_over_the_daemon_migrates_to_a_newer_kernel(nursery, pki):
    """An SVE VM the daemon created (VmRegistry.create finalizes it, as a VMM would) moves a64fx 6.12 -> 7.3: its
    vector lengths identical, ID_AA64PFR0_EL1 planned against the destination's SVE view, Z registers equal."""
    a, b, res, plan, z3 = await _sve_migration(nursery, pki, "a64fx@6.12", "a64fx@7.3")
    assert not isinstance(res, PeerError) and res.result == "committed", res
    rows = {e.register: e.verdict for e in plan.entries if not e.field}
    assert rows["KVM_REG_ARM64_SVE_VLS"] is Verdict.IDENTICAL and rows["ID_AA64PFR0_EL1"] is not Verdict.REFUSE
    dst = b.registry.get("vm-1").vcpus
    assert [dst[i].get_reg(z3) for i in (0, 1)] == [1 | 0x5A5A, 1 | (0x5A5A << 16)]


async def test_sve_vm_refused_where_kvm_cannot_offer_its_lengths(nursery, pki):
    a, b, res, plan, _ = await _sve_migration(nursery, pki, "a64fx@7.3", "max@7.3")
    assert isinstance(res, PeerError) and res.kind == "plan" and "384" in str(res)
    assert a.registry.get("vm-1").state is VmState.RUNNING and b.registry.vms == {}


async def test_a_handler_that_crashes_fails_its_connection_alone(nursery, pki, caplog):
    """An exception the incoming-migration code did not expect ends that connection (logged at error with the peer
    and the exception), never the listener: the next connection is served."""
    b = Node(sim(), pki)
    seen = []

    async def handler(stream, peer):
        seen.append(peer)
        if len(seen) == 1:
            raise RuntimeError("boom in the handler")
        await stream.send_all(b"ok")
    lst = tls.PeerListener(handler, b.server_ctx, "127.0.0.1", 0, handshake_timeout=5)
    port = await nursery.start(lst.run)
    a = Node(sim(), pki, "node-a")
    for expect in (b"", b"ok"):
        s = await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost")
        try:
            got = await s.receive_some(10)
        except trio.BrokenResourceError:
            got = b""
        assert got == expect
        await s.aclose()
    assert seen == ["node-a", "node-a"]
    assert any("connection handler failed: RuntimeError: boom in the handler" in r.getMessage() and
               r.levelname == "ERROR" for r in caplog.records)


async def test_connections_that_never_authenticate_are_capped(nursery, pki):
    """Idle TCP connections that never finish TLS cannot take every fd: past max_unauthenticated a new one is closed
    at once (refusal recorded); once they go, an authenticated peer is served."""
    b = Node(sim(), pki)
    served = []

    async def handler(stream, peer):
        served.append(peer)
        await stream.send_all(b"ok")
    lst = tls.PeerListener(handler, b.server_ctx, "127.0.0.1", 0, handshake_timeout=5, max_unauthenticated=2)
    port = await nursery.start(lst.run)
    idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
    await trio.sleep(0.1)
    extra = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(2):
        assert await extra.receive_some(10) == b""              # closed by the listener
    assert any("too many connections in their TLS handshake" in r for r in lst.refused)
    for s in idle + [extra]:
        await s.aclose()
    await trio.sleep(0.1)
    a = Node(sim(), pki, "node-a")
    s = await tls.connect("127.0.0.1", port, a.client_ctx, server_hostname="localhost")
    assert await s.receive_some(10) == b"ok" and served == ["node-a"]
    await s.aclose()
