"""Bench: stream a 256-vCPU VM (full arm64 register set, SVE on) between two daemons over mutual TLS on
loopback, against raw TLS throughput measured in the same run. Source and destination run in separate
processes (as on two hosts: no shared GIL), and so do both ends of the raw-TLS baseline; 4 rounds (ROUNDS=) of 5
runs each, a round of the peer then a round of the baseline, so both see the same machine.

Register set per vCPU: the real max@7.3 profile's list with SVE enabled (V0-31 replaced by Z0-31 U2048,
P0-15 U256, FFR, VLS), Z/P/FFR filled with random data. Both ends use the simulated host (SimHost).

Printed:
  payload    register ids + values the source streams (what a VMM must move), MB
  peer       payload / (source's first chunk write .. destination verified StreamEnd), MB/s. The source
             encodes the whole stream (frames, XXH3 checksums, StreamEnd) right after reading the paused
             VM, in its "read" phase: the window is what moves bytes (as the baseline's, whose bytes exist
             before its clock starts); encoding is inside the blackout figure. The destination's window
             includes every chunk's checksum check, ordering and the StreamEnd digest.
  raw TLS    the payload's number of bytes through a plain trio SSLStream pair (same TLS contexts, same
             256 KiB writes, also two processes), MB/s
  ratio      peer / raw TLS (target >= 0.8)
  blackout   the VM runnable nowhere: source pauses it (after plan agreement and the destination's pre-flight,
             which run while it runs) -> the destination's Commit (applied, verified) arrives and the source
             releases it, s; "before pause" = migrate_out start -> pause (VM still running)
  phases     per-phase seconds on both sides

    .venv/bin/python bench/bench_stream.py [VCPUS] [--profile] [--real]

--real: both daemons on this machine's /dev/kvm instead of the simulated host (on x86 the generic path: its
register list is small, so the ratio says little; the blackout is real KVM_GET/SET_ONE_REG work).
"""
from __future__ import annotations

import cProfile
import multiprocessing as mp
import os
import pstats
import random
import sys
import tempfile
import time

import trio
from invariantd.daemon.pki import make_pki

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
CFG = PeerConfig(handshake_timeout=30, phase_timeout=60, apply_timeout=120, commit_timeout=30)
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


async def _serve(files, handler, got: trio.Semaphore, runs: int, conn) -> None:
    """A mutual-TLS listener on a free loopback port (sent over `conn`) until `runs` connections were handled
    (each handler releases `got` once)."""
    async with trio.open_nursery() as nursery:
        lst = tls.PeerListener(handler, tls.server_context(files["node-b"], None, files["ca"]), "127.0.0.1",
                               0, handshake_timeout=30)
        conn.send(await nursery.start(lst.run))
        for _ in range(runs):
            await got.acquire()
        nursery.cancel_scope.cancel()


def dst_proc(files, runs: int, conn, prof: bool, backend: str = "sim") -> None:
    """Destination daemon: one host, `runs` incoming migrations; per run its phases and result."""
    _mark_stream_end()
    dst = make_host(backend)
    reg = VmRegistry(dst)
    caps = probe(dst)
    out: list[dict] = []

    async def main():
        got = trio.Semaphore(0)

        async def handler(stream, peer):
            m = Metrics()
            res = await handle_incoming(stream, peer, backend=dst, registry=reg, caps_doc=caps, cfg=CFG, metrics=m)
            out.append({"ok": res is not None and res.result == "committed", "phases": _phases(m),
                        "stream_end": _marks.pop("stream_end"),
                        "stream_wire": _marks.pop("stream_wire")})
            for vm in list(reg.vms.values()):        # keep memory flat across runs
                reg.remove(vm.vm_id)
            got.release()

        await _serve(files, handler, got, runs, conn)
    _profiled(lambda: trio.run(main), prof, "destination")
    conn.send(out)


def src_proc(files, n: int, runs: int, port: int, conn, prof: bool, backend: str = "sim") -> None:
    """Source daemon: `runs` fresh n-vCPU VMs migrated one after the other to the destination process (each
    created just before its run: a real host need not hold them all)."""
    _mark_first_write()
    out: list[dict] = []

    async def main():
        for i in range(runs):
            reg, payload = source_vm(n, f"vm-{i}", backend)
            mvm = reg.get(f"vm-{i}")
            t_release: list[float] = []
            t_pause: list[float] = []
            real_release, real_pause = mvm.release, mvm.pause

            def release(real_release=real_release, t_release=t_release):
                t_release.append(time.perf_counter())
                real_release()

            def pause(real_pause=real_pause, t_pause=t_pause):
                t_pause.append(time.perf_counter())
                real_pause()
            mvm.release, mvm.pause = release, pause
            m = Metrics()
            stream = await tls.connect("127.0.0.1", port, tls.client_context(files["node-a"], None, files["ca"]),
                                       server_hostname="localhost")
            nregs = len(mvm.vcpus[0].reg_list())          # before: a released VM's vCPUs are freed on the ack
            t0 = time.perf_counter()
            res = await migrate_out(stream, reg, f"vm-{i}", cfg=CFG, metrics=m)
            t_end = time.perf_counter()
            await stream.aclose()
            assert res.result == "committed"
            out.append({"payload": payload, "regs_per_vcpu": nregs,
                        "blackout": t_release[0] - t_pause[0], "total": t_end - t0,
                        "before_pause": t_pause[0] - t0, "phases": _phases(m),
                        "first_write": _marks.pop("first_write"),
                        "wire": m.stream_bytes.labels("sent")._value.get()})
    _profiled(lambda: trio.run(main), prof, "source")
    conn.send(out)


def peer_runs(files, n: int, runs: int, prof: bool, backend: str = "sim") -> tuple[list[dict], list[dict]]:
    ctx = mp.get_context("spawn")
    d_parent, d_child = ctx.Pipe()
    s_parent, s_child = ctx.Pipe()
    dp = ctx.Process(target=dst_proc, args=(files, runs, d_child, prof, backend))
    dp.start()
    port = d_parent.recv()
    sp = ctx.Process(target=src_proc, args=(files, n, runs, port, s_child, prof, backend))
    sp.start()
    src = s_parent.recv()
    dst = d_parent.recv()
    sp.join(30)
    dp.join(30)
    return src, dst


# --- the raw-TLS baseline: the same two-process shape, the same bytes and write size --------------------------
def raw_server(files, nbytes: int, runs: int, conn) -> None:
    ends: list[float] = []

    async def main():
        got = trio.Semaphore(0)

        async def handler(stream, peer):
            k = 0
            while k < nbytes:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    break
                k += len(data)
            ends.append(time.perf_counter())
            await stream.send_all(b"k")
            got.release()

        await _serve(files, handler, got, runs, conn)
    trio.run(main)
    conn.send(ends)


def raw_client(files, nbytes: int, runs: int, port: int, conn) -> None:
    starts: list[float] = []
    buf = os.urandom(RAW_WRITE)

    async def main():
        for _ in range(runs):
            s = await tls.connect("127.0.0.1", port, tls.client_context(files["node-a"], None, files["ca"]),
                                  server_hostname="localhost")
            t0 = time.perf_counter()
            left = nbytes
            while left > 0:
                k = min(left, RAW_WRITE)
                await s.send_all(buf[:k])
                left -= k
            await s.receive_some(1)                  # the server read everything
            starts.append(t0)
            await s.aclose()
    trio.run(main)
    conn.send(starts)


def raw_runs(files, nbytes: int, runs: int) -> list[float]:
    """Seconds per run to move nbytes client -> server (first write .. last byte read), two processes."""
    ctx = mp.get_context("spawn")
    d_parent, d_child = ctx.Pipe()
    s_parent, s_child = ctx.Pipe()
    dp = ctx.Process(target=raw_server, args=(files, nbytes, runs, d_child))
    dp.start()
    port = d_parent.recv()
    sp = ctx.Process(target=raw_client, args=(files, nbytes, runs, port, s_child))
    sp.start()
    starts = s_parent.recv()
    ends = d_parent.recv()
    sp.join(30)
    dp.join(30)
    return [e - s for s, e in zip(starts, ends)]


def main(argv: list[str]) -> int:
    n = int(next((a for a in argv if a.isdigit()), 256))
    prof = "--profile" in argv
    backend = "kvm" if "--real" in argv else "sim"
    runs, rounds = 5, int(os.environ.get("ROUNDS", "4"))    # rounds alternate peer and raw (same machine state)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        files = pki(d)
        src, dst, raws = [], [], []
        for _ in range(rounds):
            s_, d_ = peer_runs(files, n, runs, prof, backend)
            assert all(x["ok"] for x in d_), d_
            src += s_
            dst += d_
            raws += raw_runs(files, src[0]["payload"], runs)
        payload = src[0]["payload"]
        runs *= rounds
    mb = payload / 1e6
    streams = [d_["stream_end"] - s_["first_write"] for s_, d_ in zip(src, dst)]
    best = min(range(runs), key=lambda i: streams[i])
    raw = min(raws)
    med = lambda xs: sorted(xs)[len(xs) // 2]          # noqa: E731
    peer_rate, raw_rate = mb / streams[best], mb / raw
    wire = dst[best]["stream_wire"]
    blackouts = [x["blackout"] for x in src]
    if backend == "kvm":
        print(f"VM: {n} vCPUs x {src[0]['regs_per_vcpu']} registers on this machine's /dev/kvm (both ends; the "
              f"generic path); source and destination in separate processes")
    else:
        print(f"VM: {n} vCPUs x {src[0]['regs_per_vcpu']} registers (SVE: Z0-31 U2048, P0-15, FFR, VLS), "
              f"profile {PROFILE} (simulated host both ends); source and destination in separate processes")
    print(f"payload  {mb:8.2f} MB   (register ids + values, per vCPU); peer stream on the wire {wire / 1e6:.2f} MB "
          f"(chunks + StreamEnd)")
    print(f"peer     {peer_rate:8.1f} MB/s  payload / (source first chunk write .. destination StreamEnd verified), "
          f"best of {runs}: {streams[best] * 1e3:.2f} ms; median {med(streams) * 1e3:.2f} ms")
    print(f"raw TLS  {raw_rate:8.1f} MB/s  the payload's bytes, first write .. last byte read, best of {runs}: "
          f"{raw * 1e3:.2f} ms; median {med(raws) * 1e3:.2f} ms ({RAW_WRITE // 1024} KiB writes, 2 processes)")
    print(f"ratio    {peer_rate / raw_rate:8.2f} x  (target >= 0.8; median/median {med(raws) / med(streams):.2f} x; "
          f"wire bytes/s vs raw bytes/s {wire / streams[best] / (payload / raw):.2f} x)")
    print(f"blackout {min(blackouts):8.3f} s   (median {med(blackouts):.3f} s; source pause -> destination "
          f"applied+verified+committed; before the pause, VM running: {med([x['before_pause'] for x in src]):.3f} s"
          f", whole migration {med([x['total'] for x in src]):.3f} s)")
    print("phases   source: " + "  ".join(f"{k} {v * 1e3:.1f}ms" for k, v in src[best]["phases"].items()))
    print("         destination: " + "  ".join(f"{k} {v * 1e3:.1f}ms" for k, v in dst[best]["phases"].items()))
    print(f"bench wall time {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
