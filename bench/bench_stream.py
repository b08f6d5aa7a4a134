"""Bench: stream a 256-vCPU VM (full arm64 register set, SVE on) between two in-process daemons over mutual
TLS on loopback, against raw TLS throughput measured in the same run.

Register set per vCPU: the real max@7.3 profile's list with SVE enabled (V0-31 replaced by Z0-31 U2048,
P0-15 U256, FFR, VLS), Z/P/FFR filled with random data. Both ends use the simulated host (SimHost).

Printed:
  payload    register ids + values the source streams (what a VMM must move), MB
  peer       payload / destination stream phase (first chunk received .. StreamEnd verified), MB/s
  raw TLS    the same number of bytes through a plain trio SSLStream pair (same TLS contexts), MB/s
  ratio      peer / raw TLS (target >= 0.8)
  blackout   source VM paused -> destination applied, verified and committed (source may release), s
  phases     per-phase seconds on both sides

    .venv/bin/python bench/bench_stream.py [VCPUS] [--profile]
"""
from __future__ import annotations

import cProfile
import os
import pstats
import random
import sys
import tempfile
import time

import trio
import trustme

from invariantd.daemon import tls
from invariantd.daemon.kvm.backend import VcpuInit
from invariantd.daemon.metrics import Metrics
from invariantd.daemon.peer import PeerConfig, handle_incoming, migrate_out
from invariantd.daemon.probe import probe
from invariantd.daemon.sim.host import SimHost
from invariantd.daemon.vms import VmRegistry
from invariantd.protocol import kvmabi as abi
from invariantd.protocol import regid

PROFILE = "max@7.3"
CFG = PeerConfig(handshake_timeout=30, phase_timeout=60, apply_timeout=120, commit_timeout=30)
RAW_WRITE = 256 * 1024


def pki(d: str) -> dict[str, str]:
    ca = trustme.CA()
    files = {"ca": os.path.join(d, "ca.pem")}
    ca.cert_pem.write_to_path(files["ca"])
    for name in ("node-a", "node-b"):
        files[name] = os.path.join(d, f"{name}.pem")
        ca.issue_cert("localhost", "127.0.0.1", common_name=name).private_key_and_cert_chain_pem.write_to_path(
            files[name])
    return files


def source_vm(n: int) -> tuple[VmRegistry, int]:
    host = SimHost(PROFILE)
    reg = VmRegistry(host)
    pref = host.init.target
    feats = (abi.VCPU_FEATURES["PSCI_0_2"], abi.KVM_ARM_VCPU_SVE)
    mvm = reg.create("vm-big", n, init=VcpuInit(pref, feats))
    rnd = random.Random(1)
    payload = 0
    for v in mvm.vcpus.values():
        v.finalize(abi.KVM_ARM_VCPU_SVE)
        for r in v.reg_list():
            d = regid.decode(r)
            if d.group == "sve" and r != regid.SVE_VLS:
                v.set_reg(r, rnd.getrandbits(8 * regid.size_bytes(r)))
            payload += 8 + regid.size_bytes(r)
    return reg, payload


async def peer_run(files, n: int) -> dict:
    reg_a, payload = source_vm(n)
    mvm = reg_a.get("vm-big")
    dst = SimHost(PROFILE)
    reg_b, ma, mb = VmRegistry(dst), Metrics(), Metrics()
    caps = probe(dst)
    done = trio.Event()
    out: dict = {"payload": payload, "regs_per_vcpu": len(mvm.vcpus[0].reg_list())}

    async def handler(stream, peer):
        try:
            out["dst"] = await handle_incoming(stream, peer, backend=dst, registry=reg_b, caps_doc=caps, cfg=CFG,
                                               metrics=mb)
        finally:
            done.set()

    t_release = []
    real_release = mvm.release

    def release():
        t_release.append(time.perf_counter())
        real_release()
    mvm.release = release

    async with trio.open_nursery() as nursery:
        lst = tls.PeerListener(handler, tls.server_context(files["node-b"], None, files["ca"]), "127.0.0.1", 0,
                               handshake_timeout=30)
        port = await nursery.start(lst.run)
        stream = await tls.connect("127.0.0.1", port, tls.client_context(files["node-a"], None, files["ca"]),
                                   server_hostname="localhost")
        t0 = time.perf_counter()                      # migrate_out pauses the VM first thing
        res = await migrate_out(stream, reg_a, "vm-big", cfg=CFG, metrics=ma)
        t_end = time.perf_counter()
        await done.wait()
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert res.result == "committed" and out["dst"] is not None and out["dst"].result == "committed"
    out["blackout"] = t_release[0] - t0
    out["total"] = t_end - t0
    out["src_phases"] = {p: ma.phase_seconds.labels(p)._sum.get() for p in
                         ("handshake", "plan", "preflight", "stream", "apply", "commit")}
    out["dst_phases"] = {p: mb.phase_seconds.labels(p)._sum.get() for p in
                         ("handshake", "plan", "preflight", "stream", "apply", "commit")}
    out["wire"] = ma.stream_bytes.labels("sent")._value.get()
    return out


async def raw_run(files, nbytes: int) -> float:
    """Seconds to move nbytes client -> server through trio SSLStreams (first write .. last byte read)."""
    got = trio.Event()
    times = {}

    async def handler(stream, peer):
        n = 0
        while n < nbytes:
            data = await stream.receive_some(65536)
            if not data:
                break
            n += len(data)
        times["end"] = time.perf_counter()
        await stream.send_all(b"k")
        got.set()

    buf = os.urandom(RAW_WRITE)
    async with trio.open_nursery() as nursery:
        lst = tls.PeerListener(handler, tls.server_context(files["node-b"], None, files["ca"]), "127.0.0.1", 0,
                               handshake_timeout=30)
        port = await nursery.start(lst.run)
        s = await tls.connect("127.0.0.1", port, tls.client_context(files["node-a"], None, files["ca"]),
                              server_hostname="localhost")
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            k = min(left, RAW_WRITE)
            await s.send_all(buf[:k])
            left -= k
        await got.wait()
        await s.aclose()
        nursery.cancel_scope.cancel()
    return times["end"] - t0


def main(argv: list[str]) -> int:
    n = int(next((a for a in argv if a.isdigit()), 256))
    prof = "--profile" in argv
    with tempfile.TemporaryDirectory() as d:
        files = pki(d)
        t_start = time.perf_counter()
        if prof:
            pr = cProfile.Profile()
            pr.enable()
        peer = trio.run(peer_run, files, n)
        if prof:
            pr.disable()
        raws = [trio.run(raw_run, files, peer["payload"]) for _ in range(3)]
        raw = min(raws)
    mb = peer["payload"] / 1e6
    t_stream = peer["dst_phases"]["stream"]
    peer_rate, raw_rate = mb / t_stream, mb / raw
    print(f"VM: {n} vCPUs x {peer['regs_per_vcpu']} registers (SVE: Z0-31 U2048, P0-15, FFR, VLS), "
          f"profile {PROFILE} (simulated host both ends)")
    print(f"payload  {mb:8.2f} MB   wire (source sent, all messages) {peer['wire'] / 1e6:.2f} MB")
    print(f"peer     {peer_rate:8.1f} MB/s  (destination stream phase {t_stream * 1e3:.1f} ms)")
    print(f"raw TLS  {raw_rate:8.1f} MB/s  ({raw * 1e3:.1f} ms, best of 3, {RAW_WRITE // 1024} KiB writes)")
    print(f"ratio    {peer_rate / raw_rate:8.2f} x  (target >= 0.8)")
    print(f"blackout {peer['blackout']:8.3f} s   (source paused -> destination applied+verified+committed)")
    print("phases   source: " + "  ".join(f"{k} {v * 1e3:.0f}ms" for k, v in peer["src_phases"].items()))
    print("         destination: " + "  ".join(f"{k} {v * 1e3:.0f}ms" for k, v in peer["dst_phases"].items()))
    print(f"bench wall time {time.perf_counter() - t_start:.1f} s")
    if prof:
        pstats.Stats(pr).sort_stats(os.environ.get("SORT", "cumulative")).print_stats(35)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
