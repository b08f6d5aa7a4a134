"""Bench: stream a 256-vCPU VM (full arm64 register set, SVE on) between two daemons over mutual TLS on loopback,
paired with raw TLS moving the same number of wire bytes (issue 14 P2, P3).

    .venv/bin/python bench/bench_stream.py [VCPUS] [--rounds 12] [--profile] [--real] [--pin] [--no-pipeline]

Two processes (as on two hosts: no shared GIL): the destination serves both a peer listener (handle_incoming) and a
raw TLS listener; the source alternates, round after round, a peer migration and a raw transfer, the order rotated
every round (bench/pairing.py's rule), after one warm-up migration that also tells how many bytes the peer stream
puts on the wire. Both directions use the same TLS contexts; the raw transfer first completes one round trip on its
connection (the TLS 1.3 handshake and session tickets done on both ends, as they are by the time a migration
streams), then writes the peer's wire bytes in 256 KiB writes; the server notes when it read the last byte.

Register set per vCPU: the real max@7.3 profile's list with SVE enabled (V0-31 replaced by Z0-31 U2048, P0-15
U256, FFR, VLS), Z/P/FFR filled with random data; the simulated host both ends (--real: this machine's /dev/kvm).
--pin: the source process on CPU 0, the destination on CPU 1 - two one-CPU hosts, whose work can overlap (without
it both share every CPU, and the floor is the sum of both sides' work; the source pipelines its read with the stream
only then, as it does with a peer on another machine, not on its own: PeerConfig.pipeline_same_host).
--no-pipeline: the source reads every vCPU before it streams, pinned too (PeerConfig.pipeline_vcpus = 0).

Printed (median [min..max] over the rounds, and the load):
  wire       bytes the peer stream puts on the wire (chunks + StreamEnd: what both variants move); payload = ids +
             values, for reference
  peer       wire bytes / (source's first chunk write .. destination verified StreamEnd): the protocol's transport,
             every chunk's checksum, order and the stream digest checked (the destination applies on the simulated
             host after StreamEnd, on real KVM in worker threads meanwhile)
  raw TLS    the same bytes, first write .. last byte read, on a warm connection
  ratio      peer / raw TLS, of the medians (target >= 0.8)
  blackout   source pause -> destination applied, verified and committed (the VM runnable nowhere); with the
             simulator's own share measured beside it: the same register reads and writes straight on SimVcpu (the
             bound below which no daemon can go on this simulator)
  phases     per-phase medians, both sides
"""
from __future__ import annotations

import cProfile
import multiprocessing as mp
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairing import load  # noqa: E402

from invariantd.daemon.pki import make_pki  # noqa: E402

from invariantd.daemon import tls
from invariantd.daemon.kvm.backend import VcpuInit
from invariantd.daemon.metrics import Metrics
from invariantd.daemon import peer as peer_mod
from invariantd.daemon.peer import RECEIVE_BYTES, PeerConfig, handle_incoming, migrate_out
from invariantd.daemon.probe import probe
from invariantd.daemon.sim.host import SimHost
from invariantd.daemon.vms import VmRegistry
from invariantd.protocol import kvmabi as abi
from invariantd.protocol import regid
from invariantd.protocol import session as ps

PROFILE = "max@7.3"
CFG = PeerConfig(handshake_timeout=30, phase_timeout=60, apply_timeout=120, commit_timeout=30,
                 pipeline_vcpus=0 if "--no-pipeline" in sys.argv else PeerConfig.pipeline_vcpus,
                 pipeline_same_host="--pin" in sys.argv)       # pinned: the two ends stand for two hosts
RAW_WRITE = 256 * 1024


def pki(d: str) -> dict[str, str]:
    return make_pki(d, nodes=("node-a", "node-b"))


def make_host(backend: str):
    if backend == "kvm":
        from invariantd.daemon.kvm.real import RealKvm
        return RealKvm()
    return SimHost(PROFILE)


def source_vm(n: int, name: str = "vm-big", backend: str = "sim") -> tuple[VmRegistry, int]:
    """The VM to migrate and its payload bytes. sim: the max@7.3 profile with SVE on, Z/P/FFR random.
    kvm: this machine's /dev/kvm (x86: the generic path, the registers KVM_GET_REG_LIST / the MSR list gives)."""
    host = make_host(backend)
    reg = VmRegistry(host)
    if backend == "kvm":
        mvm = reg.create(name, n)
        return reg, sum(8 + regid.size_bytes(r) for v in mvm.vcpus.values() for r in v.reg_list())
    pref = host.init.target
    feats = (abi.VCPU_FEATURES["PSCI_0_2"], abi.KVM_ARM_VCPU_SVE)
    mvm = reg.create(name, n, init=VcpuInit(pref, feats))
    rnd = random.Random(1)
    payload = 0
    for v in mvm.vcpus.values():             # created finalized (VmRegistry.create), at the host's lengths
        for r in v.reg_list():
            d = regid.decode(r)
            if d.group == "sve" and r != regid.SVE_VLS:
                v.set_reg(r, rnd.getrandbits(8 * regid.size_bytes(r)))
            payload += 8 + regid.size_bytes(r)
    return reg, payload


# --- the peer migration: destination and source each in their own process --------------------------------------
PHASES = ("handshake", "plan", "preflight", "read", "stream", "apply", "commit")


def _phases(m: Metrics) -> dict[str, float]:
    return {p: m.phase_seconds.labels(p)._sum.get() for p in PHASES}


def _profiled(fn, prof: bool, label: str):
    if not prof:
        return fn()
    pr = cProfile.Profile()
    pr.enable()
    try:
        return fn()
    finally:
        pr.disable()
        print(f"--- profile: {label} ---", file=sys.stderr)
        pstats.Stats(pr, stream=sys.stderr).sort_stats(os.environ.get("SORT", "tottime")).print_stats(25)


# Stream timing like the raw baseline's (first write .. last byte handled), across the two processes (perf_counter
# is CLOCK_MONOTONIC, one clock per machine): the source notes its first chunk write, the destination the moment
# StreamEnd was received and verified (every chunk checksummed, ordered, the digest matched).
_marks: dict[str, float] = {}


def _mark_first_write() -> None:
    orig = peer_mod.Conn.send_prepared

    async def send_prepared(self, prep, *a, **kw):
        _marks.setdefault("first_write", time.perf_counter())
        await orig(self, prep, *a, **kw)
    peer_mod.Conn.send_prepared = send_prepared


def _mark_stream_end() -> None:
    orig = peer_mod.Conn.expect

    async def expect(self, *types):
        if ps.VcpuChunk in types:
            _marks.setdefault("stream_start_bytes", self.session.bytes_received)
        ev = await orig(self, *types)
        if isinstance(ev, ps.StreamEnd):
            _marks["stream_end"] = time.perf_counter()
            _marks["stream_wire"] = self.session.bytes_received - _marks.pop("stream_start_bytes")
        return ev
    peer_mod.Conn.expect = expect


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})      # --pin: this process (and its threads) on one CPU, as on its own host


def dst_proc(files, peer_runs: int, raw_runs: int, conn, prof: bool, backend: str = "sim",
             cpu: int | None = None) -> None:
    """Destination: a peer listener (handle_incoming) and a raw TLS listener, until `peer_runs` migrations and
    `raw_runs` raw transfers were handled; then per migration its phases, StreamEnd time and wire bytes, and per raw
    transfer the time its last byte was read."""
    _pin(cpu)
    _mark_stream_end()
    dst = make_host(backend)
    reg = VmRegistry(dst)
    caps = probe(dst)
    peers: list[dict] = []
    raws: list[float] = []

    async def main():
        done = trio.Semaphore(0)

        async def on_peer(stream, peer):
            m = Metrics()
            res = await handle_incoming(stream, peer, backend=dst, registry=reg, caps_doc=caps, cfg=CFG, metrics=m)
            peers.append({"ok": res is not None and res.result == "committed", "phases": _phases(m),
                          "stream_end": _marks.pop("stream_end"), "stream_wire": _marks.pop("stream_wire")})
            for vm in list(reg.vms.values()):        # keep memory flat across runs
                reg.remove(vm.vm_id)
            done.release()

        async def on_raw(stream, peer):
            head = b""
            while len(head) < 8:                     # the round trip: 8 bytes (how many follow), answered
                head += await stream.receive_some(8 - len(head))
            nbytes = int.from_bytes(head, "little")
            await stream.send_all(b"y")
            k = 0
            while k < nbytes:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    break
                k += len(data)
            raws.append(time.perf_counter())
            await stream.send_all(b"k")
            done.release()

        ctx = tls.server_context(files["node-b"], None, files["ca"])
        async with trio.open_nursery() as nursery:
            ports = []
            for handler in (on_peer, on_raw):
                lst = tls.PeerListener(handler, ctx, "127.0.0.1", 0, handshake_timeout=30)
                ports.append(await nursery.start(lst.run))
            conn.send(tuple(ports))
            for _ in range(peer_runs + raw_runs):
                await done.acquire()
            nursery.cancel_scope.cancel()
    _profiled(lambda: trio.run(main), prof, "destination")
    conn.send((peers, raws))


def src_proc(files, n: int, rounds: int, ports, conn, prof: bool, backend: str = "sim",
             cpu: int | None = None) -> None:
    """Source: one warm-up migration (its wire bytes size the raw transfers), then `rounds` rounds of a migration
    and a raw transfer of as many bytes, the order alternating. Each migration's VM is created just before it."""
    _pin(cpu)
    _mark_first_write()
    peers: list[dict] = []
    raws: list[float] = []
    wire = [0]
    buf = os.urandom(RAW_WRITE)
    cctx = tls.client_context(files["node-a"], None, files["ca"])

    async def migrate(i: int) -> dict:
        reg, payload = source_vm(n, f"vm-{i}", backend)
        mvm = reg.get(f"vm-{i}")
        t_release: list[float] = []
        t_pause: list[float] = []
        real_release, real_pause = mvm.release, mvm.pause

        def release():
            t_release.append(time.perf_counter())
            real_release()

        def pause():
            t_pause.append(time.perf_counter())
            real_pause()
        mvm.release, mvm.pause = release, pause
        m = Metrics()
        stream = await tls.connect("127.0.0.1", ports[0], cctx, server_hostname="localhost")
        nregs = len(mvm.vcpus[0].reg_list())          # before: a released VM's vCPUs are freed on the ack
        t0 = time.perf_counter()
        res = await migrate_out(stream, reg, f"vm-{i}", cfg=CFG, metrics=m)
        t_end = time.perf_counter()
        await stream.aclose()
        assert res.result == "committed"
        return {"payload": payload, "regs_per_vcpu": nregs, "blackout": t_release[0] - t_pause[0],
                "total": t_end - t0, "before_pause": t_pause[0] - t0, "phases": _phases(m),
                "first_write": _marks.pop("first_write"), "wire": m.stream_bytes.labels("sent")._value.get()}

    async def raw() -> float:
        s = await tls.connect("127.0.0.1", ports[1], cctx, server_hostname="localhost")
        await s.send_all(int(wire[0]).to_bytes(8, "little"))
        await s.receive_some(1)                      # a warm connection, as a migration's is when it streams
        t0 = time.perf_counter()
        left = wire[0]
        while left > 0:
            k = min(left, RAW_WRITE)
            await s.send_all(buf[:k])
            left -= k
        await s.receive_some(1)                      # the server read everything
        await s.aclose()
        return t0

    async def main():
        first = await migrate(0)                     # warm-up: caches, and the bytes a migration streams
        wire[0] = int(first["wire"])
        for r in range(rounds):
            for kind in (("peer", "raw") if r % 2 == 0 else ("raw", "peer")):
                if kind == "peer":
                    peers.append(await migrate(r + 1))
                else:
                    raws.append(await raw())
    _profiled(lambda: trio.run(main), prof, "source")
    conn.send((peers, raws, wire[0]))


def run_pair(files, n: int, rounds: int, prof: bool, backend: str, pin: bool = False):
    ctx = mp.get_context("spawn")
    d_parent, d_child = ctx.Pipe()
    s_parent, s_child = ctx.Pipe()
    dp = ctx.Process(target=dst_proc, args=(files, rounds + 1, rounds, d_child, prof, backend, 1 if pin else None))
    dp.start()
    ports = d_parent.recv()
    sp = ctx.Process(target=src_proc, args=(files, n, rounds, ports, s_child, prof, backend, 0 if pin else None))
    sp.start()
    src, raw_starts, wire = s_parent.recv()
    dst, raw_ends = d_parent.recv()
    sp.join(30)
    dp.join(30)
    return src, dst[1:], [e - s for s, e in zip(raw_starts, raw_ends)], wire


def simulator_bound(n: int) -> float:
    """The simulator's own share of a blackout: the register traffic that falls inside it, straight on SimVcpu, no
    daemon - read every register of the paused VM; on a destination whose VM was built beforehand (as the daemon's
    pre-flight does, VM-wide registers written and read back there), write each vCPU's other registers, then read
    those back. Seconds."""
    from invariantd.daemon.apply import vm_wide
    from invariantd.daemon.readback import read_vm
    reg, _ = source_vm(n, "bound")
    mvm = reg.get("bound")
    dst = make_host("sim")
    vm = dst.create_vm()
    feats = (abi.VCPU_FEATURES["PSCI_0_2"], abi.KVM_ARM_VCPU_SVE)
    vcpus = {}
    for i in range(n):
        v = vm.create_vcpu(i)
        v.init(VcpuInit(dst.init.target, feats))
        v.finalize(abi.KVM_ARM_VCPU_SVE)
        vcpus[i] = v
    keep = None
    took = 0.0
    t0 = time.perf_counter()
    sets = read_vm(mvm.vcpus)
    took += time.perf_counter() - t0
    state = {}
    for i, rs in sets.items():                  # the split is the daemon's work (memoised there): not timed
        keep = keep or [k for k, r in enumerate(rs.ids) if r != regid.SVE_VLS and not vm_wide(r)]
        state[i] = rs.pick(keep)
    t0 = time.perf_counter()
    for i, rs in state.items():
        vcpus[i].set_regs(rs)
    for i, v in vcpus.items():
        v.get_regs(state[i].ids)
    return took + time.perf_counter() - t0


def kvm_bound(n: int, threads: int) -> tuple[float, float]:
    """The ioctl floor of a blackout on this machine's /dev/kvm, in C (bench/cref.c): a source VM's n vCPUs read
    (every register, KVM_GET_ONE_REG), then, on a destination VM built beforehand, every register written and read
    back - each step spread over `threads` threads on disjoint vCPU ranges, as the daemon's worker threads are.
    (seconds of the read, seconds of the write + read-back)"""
    import ctypes
    import threading
    import cref
    from invariantd.daemon.readback import read_vm
    lib = cref.load()
    reg, _ = source_vm(n, "bound-src", "kvm")
    dreg, _ = source_vm(n, "bound-dst", "kvm")
    src, dst = reg.get("bound-src"), dreg.get("bound-dst")
    sets = read_vm(src.vcpus)
    arrays = cref.Arrays([sets[i] for i in sorted(sets)])
    fds = {k: (ctypes.c_int * n)(*(vm.vcpus[i].fd for i in sorted(vm.vcpus))) for k, vm in (("src", src), ("dst", dst))}
    bounds = [(t * n // threads, (t + 1) * n // threads) for t in range(threads)]

    def step(which: str, get: int) -> float:
        bad = [ctypes.c_int(0) for _ in bounds]
        ts = [threading.Thread(target=lib.cref_blackout_part, args=(fds[which], lo, hi, arrays.ids, arrays.data,
                                                                     arrays.stride, arrays.offs, arrays.n, get,
                                                                     ctypes.byref(b)))
              for (lo, hi), b in zip(bounds, bad)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return time.perf_counter() - t0
    got = [(step("src", 1), step("dst", 0)) for _ in range(5)]
    read = statistics.median(g[0] for g in got)
    write = statistics.median(g[1] for g in got)
    reg.close()
    dreg.close()
    return read, write


def main(argv: list[str]) -> int:
    n = int(next((a for a in argv if a.isdigit()), 256))
    prof = "--profile" in argv
    backend = "kvm" if "--real" in argv else "sim"
    rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 12
    pin = "--pin" in argv
    t_start = time.perf_counter()
    print(f"before: {load()}")
    with tempfile.TemporaryDirectory() as d:
        files = pki(d)
        src, dst, raws, wire = run_pair(files, n, rounds, prof, backend, pin)
    assert all(x["ok"] for x in dst), dst
    payload = src[0]["payload"]
    streams = [d_["stream_end"] - s_["first_write"] for s_, d_ in zip(src, dst)]
    med = statistics.median
    if backend == "kvm":
        print(f"VM: {n} vCPUs x {src[0]['regs_per_vcpu']} registers on this machine's /dev/kvm (both ends; the "
              f"generic path); source and destination in separate processes"
              f"{', pinned to CPU 0 and CPU 1 (two one-CPU hosts)' if pin else ''}; {rounds} rounds")
    else:
        print(f"VM: {n} vCPUs x {src[0]['regs_per_vcpu']} registers (SVE: Z0-31 U2048, P0-15, FFR, VLS), "
              f"profile {PROFILE} (simulated host both ends); separate processes; {rounds} rounds")
    print(f"wire     {wire / 1e6:8.2f} MB  (chunks + StreamEnd; both variants move these bytes); payload "
          f"{payload / 1e6:.2f} MB (ids + values)")
    rate = lambda t: wire / t / 1e6                   # noqa: E731
    print(f"peer     {rate(med(streams)):8.1f} MB/s  median {med(streams) * 1e3:.2f} ms "
          f"[{min(streams) * 1e3:.2f}..{max(streams) * 1e3:.2f}]  first chunk write .. StreamEnd verified")
    print(f"raw TLS  {rate(med(raws)):8.1f} MB/s  median {med(raws) * 1e3:.2f} ms "
          f"[{min(raws) * 1e3:.2f}..{max(raws) * 1e3:.2f}]  first write .. last byte read, warm connection")
    ratio = med(raws) / med(streams)
    print(f"ratio    {ratio:8.2f} x  peer / raw TLS on the same wire bytes, medians (target >= 0.8: "
          f"{'OK' if ratio >= 0.8 else 'MISSED'})")
    blackouts = [x["blackout"] for x in src]
    line = (f"blackout {med(blackouts) * 1e3:8.1f} ms [{min(blackouts) * 1e3:.1f}..{max(blackouts) * 1e3:.1f}]  "
            f"source pause -> destination applied + verified + committed")
    if backend == "sim":
        bound = simulator_bound(n)
        line += (f"; the simulator's own share (the same reads and writes straight on SimVcpu) "
                 f"{bound * 1e3:.1f} ms = {bound / med(blackouts):.0%}: the daemon adds "
                 f"{(med(blackouts) - bound) * 1e3:.1f} ms")
    else:
        line += f"  (target < 100 ms: {'OK' if med(blackouts) < 0.1 else 'MISSED'})"
        read, write = kvm_bound(n, 1 if pin else len(os.sched_getaffinity(0)))
        line += (f"\n         the ioctl floor in C, same threads (bench/cref.c): source read {read * 1e3:.1f} ms + "
                 f"destination write and read-back {write * 1e3:.1f} ms = {(read + write) * 1e3:.1f} ms: the daemon "
                 f"adds {(med(blackouts) - read - write) * 1e3:.1f} ms")
    print(line)
    print(f"before the pause (VM running) {med([x['before_pause'] for x in src]) * 1e3:.1f} ms, whole migration "
          f"{med([x['total'] for x in src]) * 1e3:.1f} ms")
    ph = lambda xs, k: med([x["phases"][k] for x in xs]) * 1e3     # noqa: E731
    print("phases   source: " + "  ".join(f"{k} {ph(src, k):.1f}ms" for k in PHASES))
    print("         destination: " + "  ".join(f"{k} {ph(dst, k):.1f}ms" for k in PHASES))
    print(f"after: {load()}; bench wall time {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
