"""Host side of the lab's nested QEMU runs: Debian's arm64 QEMU with -accel kvm inside the lab guests, running the
bare-metal payload (payload/payload.S), one guest alone or two guests migrating between them with stock QEMU.

    from invariantd.daemon.lab import qemu
    qemu.provision_qemu("q11")                           # kernels 6.12 + 7.x, rootfs-q11 (trixie + QEMU 11.1)
    r = qemu.run_single("7.x", "cortex-a72,midr=0x410fd084", variant="q11")
    r.summary["lines"][0]["midr"], r.result.stdout
    m = qemu.migrate_stock(variant="q11")                # 6.12 r0p3 -> 7.x r0p4, return-path on both ends
    m.dest["qemu"]["stderr_tail"], m.source["resumed"]

The guest side is daemon/lab/vmm.py (`python3 -m invariantd.daemon.lab.vmm single|source|dest`), which finds the
payload as the job input `payload.elf`. Both halves are plain functions so that another program can put its own
guest program next to QEMU: run_guest() / run_pair() take any argv lists (e.g. a script that starts the daemon and
then uses vmm.Qemu with an LD_PRELOAD agent in its env), vmm_argv() builds the runner's command line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from ._common import LabError, cache_dir, cache_lock, phase
from .guest import GuestResult, run_many_in_guest
from .provision import provision, rootfs_dir, rootfs_package_version

PAYLOAD_DIR = Path(__file__).resolve().parent / "payload"
PAYLOAD_SHIFT = 24          # a payload line every 2^24 iterations: ~0.2-1 s under nested KVM
VARIANTS = ("q10", "q11")   # provision.ROOTFS_VARIANTS with Debian's QEMU: 10.0 (trixie), 11.1 (trixie-backports)
VMM_MODULE = "invariantd.daemon.lab.vmm"
MIGRATION_PORT = 4444


@dataclasses.dataclass(frozen=True)
class GuestSpec:
    """One lab guest of a pair: kernel key, outer QEMU -cpu, address on the pair's link, MAC."""
    kernel: str
    cpu: str
    ip: str
    mac: str

    @property
    def addr(self) -> str:
        return self.ip.split("/")[0]


#: The netmig topology: the destination listens (10.0.0.1, Linux 7.x on a Cortex-A72 r0p4), the source connects
#: (10.0.0.2, Linux 6.12 on r0p3).
DEST = GuestSpec("7.x", "cortex-a72,midr=0x410fd084", "10.0.0.1/24", "52:54:00:12:34:01")
SOURCE = GuestSpec("6.12", "cortex-a72,midr=0x410fd083", "10.0.0.2/24", "52:54:00:12:34:02")


# --------------------------------------------------------------------------- provisioning, payload

def provision_qemu(variant: str = "q11", kernels: Iterable[str] = ("6.12", "7.x"), *,
                   refresh: bool = False) -> dict:
    """Make the kernels and the QEMU userland `variant` ready (idempotent, cached; only that rootfs tree, not the
    default one). -> {"kernels": versions(), "variant", "rootfs": path, "qemu": Debian version of
    qemu-system-arm in it}. Raises LabUnavailable like provision()."""
    if variant not in VARIANTS:
        raise LabError(f"unknown QEMU variant {variant!r}; known: {', '.join(VARIANTS)}")
    kv = provision(list(kernels), refresh=refresh, rootfs=(variant,))
    return {"kernels": kv, "variant": variant, "rootfs": str(rootfs_dir(variant)),
            "qemu": rootfs_package_version("qemu-system-arm", variant)}


def build_payload(shift: int = PAYLOAD_SHIFT, source_dir: os.PathLike | str | None = None) -> Path:
    """Cross-compile payload.S (payload.ld) for aarch64 with SHIFT=`shift`; cached by source content and shift
    under cache_dir()/build/payload/. -> the ELF (loads at 0x40080000)."""
    if not 4 <= int(shift) <= 40:
        raise LabError(f"payload shift {shift}: expected 4..40")
    src_dir = Path(source_dir) if source_dir else PAYLOAD_DIR
    src, lds = src_dir / "payload.S", src_dir / "payload.ld"
    h = hashlib.sha256()
    for f in (src, lds):
        h.update(f.read_bytes())
    h.update(f"SHIFT={int(shift)}".encode())
    out = cache_dir() / "build" / "payload" / h.hexdigest()[:16] / "payload.elf"
    if out.exists():
        return out
    with cache_lock("payload"), phase("build.payload"):
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".payload.{os.getpid()}.elf")
        cp = subprocess.run(["aarch64-linux-gnu-gcc", "-nostdlib", "-static", f"-DSHIFT={int(shift)}",
                             f"-Wl,-T,{lds}", "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments",
                             "-o", str(tmp), str(src)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if cp.returncode != 0:
            raise LabError(f"aarch64-linux-gnu-gcc {src} failed:\n{cp.stdout}")
        os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- guest runs

def vmm_argv(role: str, *, env: dict | None = None, qemu_args: Iterable[str] = (), caps: Iterable[str] = (),
             return_path: bool = True, **opts) -> list[str]:
    """python3 arguments running the guest-side runner: role "single" | "source" | "dest"; env: extra environment
    for the nested QEMU (LD_PRELOAD...); qemu_args: extra QEMU arguments; caps: migration capabilities besides
    return-path (return_path=False drops it); opts: further vmm options by name (lines=3, timeout=120,
    dest="tcp:10.0.0.1:4444", listen=..., cpu="host", connect_wait=..., linger=..., payload=PATH)."""
    argv = ["-m", VMM_MODULE, role]
    for k, v in (env or {}).items():
        argv.append(f"--env={k}={v}")
    for c in caps:
        argv.append(f"--cap={c}")
    if not return_path:
        argv.append("--no-return-path")
    for k, v in opts.items():
        if v is not None:
            argv.append(f"--{k.replace('_', '-')}={v}")
    argv += [f"--qemu-arg={a}" for a in qemu_args]
    return argv


def run_guest(kernel: str, cpu: str, argvs, *, variant: str = "q11", shift: int = PAYLOAD_SHIFT,
              files: dict[str, bytes] | None = None, env: dict | None = None, timeout: float = 300,
              net: tuple | None = None, on_line: Callable[[str], None] | None = None,
              on_start: Callable[[subprocess.Popen], None] | None = None, **kw) -> list[GuestResult]:
    """Boot `kernel` on outer -cpu `cpu` with the QEMU userland `variant` as / and run each python3 argv in it
    (run_many_in_guest), the payload ELF given as the job input payload.elf (vmm.PAYLOAD) besides `files`.
    -> one GuestResult per argv."""
    if variant not in VARIANTS:
        raise LabError(f"unknown QEMU variant {variant!r}; known: {', '.join(VARIANTS)}")
    inputs = {"payload.elf": build_payload(shift).read_bytes(), **(files or {})}
    return run_many_in_guest(kernel, cpu, argvs, rootfs=variant, files=inputs, env=env, timeout=timeout, net=net,
                             on_line=on_line, on_start=on_start, **kw)


def summary(result: GuestResult, who: str = "guest") -> dict:
    """The JSON document a guest program printed (vmm.py's report); LabError when there is none."""
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise LabError(f"{who}: no JSON report (rc={result.returncode}); stderr:\n{result.stderr[-3000:]}\n"
                       f"log {result.log_path}") from None


@dataclasses.dataclass
class VmmRun:
    """One guest that ran vmm.py: its report (summary) and the run (result: rc, stderr, log_path, boot time)."""
    summary: dict
    result: GuestResult


def run_single(kernel: str = DEST.kernel, cpu: str = DEST.cpu, *, variant: str = "q11", lines: int = 3,
               qemu_env: dict | None = None, qemu_args: Iterable[str] = (), files: dict[str, bytes] | None = None,
               timeout: float = 300, vmm_timeout: float = 120) -> VmmRun:
    """The payload under the guest's QEMU -accel kvm, alone; -> VmmRun (summary: vmm.run_single's report).
    qemu_env / qemu_args: extra environment / arguments of the nested QEMU; files: more job inputs (the guest
    sees NAME as /opt/ivd/job/in.NAME, e.g. qemu_env={"LD_PRELOAD": "/opt/ivd/job/in.agent.so"})."""
    argv = vmm_argv("single", env=qemu_env, qemu_args=qemu_args, lines=lines, timeout=vmm_timeout)
    r = run_guest(kernel, cpu, [argv], variant=variant, files=files, timeout=timeout)[0]
    return VmmRun(summary(r, f"single {kernel}"), r)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class PairRun:
    """Two guests on one link: their results (lists, one GuestResult per argv) and the wall time of the pair."""
    dest: list[GuestResult]
    source: list[GuestResult]
    seconds: float


def run_pair(dest_argvs, source_argvs, *, dest: GuestSpec = DEST, source: GuestSpec = SOURCE,
             variant: str = "q11", dest_variant: str | None = None, source_variant: str | None = None,
             files: dict[str, bytes] | None = None, env: dict | None = None, timeout: float = 300,
             ready_timeout: float = 90, shift: int = PAYLOAD_SHIFT) -> PairRun:
    """The netmig topology: guest `dest` (QEMU socket link listening on a free loopback port) boots first and runs
    dest_argvs; once it is READY, guest `source` (connecting) runs source_argvs. Each guest's / is the QEMU
    userland `variant` (or dest_variant / source_variant); both get `files` and the payload as job inputs, `env`
    for their programs. No QEMU outlives the call. -> PairRun; LabError when a guest fails to report."""
    port = _free_port()
    results: dict = {}
    procs: list = []
    ready = threading.Event()

    def guest(role, spec, argvs, mode, var, on_line=None):
        try:
            results[role] = run_guest(spec.kernel, spec.cpu, argvs, variant=var, shift=shift, files=files, env=env,
                                      timeout=timeout, net=(mode, port, spec.ip, spec.mac), on_line=on_line,
                                      on_start=procs.append)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller's thread
            results[role] = e
        finally:
            ready.set()

    def on_line_dest(line: str) -> None:
        if "@@IVD READY" in line:
            ready.set()

    t0 = time.monotonic()
    threads = []
    try:
        td = threading.Thread(target=guest, daemon=True, name="guest-dest", args=(
            "dest", dest, dest_argvs, "listen", dest_variant or variant, on_line_dest))
        td.start()
        threads.append(td)
        # the connecting QEMU needs the listening one up: wait for the destination's READY marker
        if not ready.wait(ready_timeout):
            raise LabError(f"destination guest not ready within {ready_timeout}s")
        if isinstance(results.get("dest"), BaseException):
            raise LabError(f"destination guest failed: {results['dest']}") from results["dest"]
        ts = threading.Thread(target=guest, daemon=True, name="guest-source", args=(
            "source", source, source_argvs, "connect", source_variant or variant))
        ts.start()
        threads.append(ts)
        for t in threads:
            t.join(max(1.0, timeout + 30 - (time.monotonic() - t0)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for t in threads:
            t.join(30)
    for role in ("dest", "source"):
        r = results.get(role)
        if r is None:
            raise LabError(f"{role} guest still running after its timeout")
        if isinstance(r, BaseException):
            raise LabError(f"{role} guest failed: {r}") from r
    return PairRun(results["dest"], results["source"], time.monotonic() - t0)


@dataclasses.dataclass
class MigrationRun:
    """A stock QEMU migration between two lab guests: both vmm.py reports and the guests' runs."""
    dest: dict
    source: dict
    pair: PairRun


def migrate_stock(*, variant: str = "q11", dest: GuestSpec = DEST, source: GuestSpec = SOURCE,
                  return_path: bool = True, caps: Iterable[str] = (), dest_env: dict | None = None,
                  source_env: dict | None = None, dest_args: Iterable[str] = (), source_args: Iterable[str] = (),
                  files: dict[str, bytes] | None = None, lines: int = 3, timeout: float = 300) -> MigrationRun:
    """Run the payload on `source`'s nested QEMU and migrate it with QEMU's own migration (tcp, port 4444) to
    `dest`'s nested QEMU (-incoming defer), return-path on both ends unless return_path=False. dest_env /
    source_env: extra environment of each QEMU (e.g. {"LD_PRELOAD": "/opt/ivd/job/in.agent.so"} with
    files={"agent.so": ...}: job inputs of both guests); dest_args / source_args: extra QEMU arguments.
    -> MigrationRun (dest / source: vmm.run_dest / vmm.run_source reports)."""
    uri = f"tcp:{dest.addr}:{MIGRATION_PORT}"
    vt = max(60, timeout - 90)          # the runner's own waits end before the guest is killed
    d_argv = vmm_argv("dest", env=dest_env, qemu_args=dest_args, caps=caps, return_path=return_path,
                      lines=lines, listen=f"tcp:0.0.0.0:{MIGRATION_PORT}", timeout=vt)
    s_argv = vmm_argv("source", env=source_env, qemu_args=source_args, caps=caps, return_path=return_path,
                      lines=lines, dest=uri, timeout=min(120, vt), connect_wait=vt)
    pair = run_pair([d_argv], [s_argv], dest=dest, source=source, variant=variant, files=files, timeout=timeout)
    return MigrationRun(summary(pair.dest[0], "destination"), summary(pair.source[0], "source"), pair)


# --------------------------------------------------------------------------- CLI

def _pairs(items, what: str) -> dict:
    out = {}
    for it in items or ():
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise SystemExit(f"{what} {it!r}: expected NAME=VALUE")
        out[k] = v
    return out


def main(argv=None) -> int:
    """python -m invariantd.daemon.lab.qemu single|migrate ...: print the vmm.py report(s) as JSON."""
    import argparse
    import logging
    import sys
    ap = argparse.ArgumentParser(prog="python -m invariantd.daemon.lab.qemu",
                                 description="Debian's arm64 QEMU -accel kvm inside lab guests, running the payload")
    ap.add_argument("cmd", choices=("provision", "single", "migrate"))
    ap.add_argument("--variant", default="q11", choices=VARIANTS)
    ap.add_argument("--kernel", default=DEST.kernel, help="single: kernel key (default 7.x)")
    ap.add_argument("--cpu", default=DEST.cpu, help="single: outer QEMU -cpu")
    ap.add_argument("--qemu-env", action="append", metavar="K=V", help="single: nested QEMU environment")
    ap.add_argument("--qemu-arg", action="append", default=[], metavar="ARG", help="single: nested QEMU argument")
    ap.add_argument("--dest-env", action="append", metavar="K=V")
    ap.add_argument("--source-env", action="append", metavar="K=V")
    ap.add_argument("--dest-arg", action="append", default=[], metavar="ARG")
    ap.add_argument("--source-arg", action="append", default=[], metavar="ARG")
    ap.add_argument("--no-return-path", action="store_true")
    ap.add_argument("--file", action="append", metavar="NAME=PATH", help="job input for the guest(s)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    files = {k: Path(v).read_bytes() for k, v in _pairs(a.file, "--file").items()}
    if a.cmd == "provision":
        out = provision_qemu(a.variant)
        rc = 0
    elif a.cmd == "single":
        r = run_single(a.kernel, a.cpu, variant=a.variant, qemu_env=_pairs(a.qemu_env, "--qemu-env"),
                       qemu_args=a.qemu_arg, files=files)
        out, rc = r.summary, r.result.returncode
    else:
        m = migrate_stock(variant=a.variant, return_path=not a.no_return_path,
                          dest_env=_pairs(a.dest_env, "--dest-env"), source_env=_pairs(a.source_env, "--source-env"),
                          dest_args=a.dest_arg, source_args=a.source_arg, files=files)
        out = {"dest": m.dest, "source": m.source, "seconds": round(m.pair.seconds, 1)}
        rc = m.pair.source[0].returncode
    json.dump(out, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())


def migrate_with_daemons(*, variant: str = "q11", dest: GuestSpec = DEST, source: GuestSpec = SOURCE,
                         timeout: float = 330, pki_dir: os.PathLike | str | None = None) -> MigrationRun:
    """The payload VM migrated by the daemons (daemon/lab/vmmig.py in both guests: the real invariantd on each
    guest's /dev/kvm, QEMU under the invariantd agent, the source daemon's migrateVmm). Certificates are made on
    the host (daemon.pki.make_pki) and the aarch64 agent is cross-compiled (guest.build_agent_lib).
    -> MigrationRun (dest / source: vmmig's reports)."""
    import tempfile
    from ..pki import make_pki
    from .guest import build_agent_lib
    d = Path(pki_dir or tempfile.mkdtemp(prefix="ivd-pki-"))
    pki = make_pki(d, nodes=("node-a", "node-b", "operator"))
    files = {f"{name}.pem": Path(path).read_bytes() for name, path in pki.items()}
    files["libivdagent.so"] = build_agent_lib().read_bytes()
    env = {"IVD_HOST_EPOCH": str(time.time())}
    d_argv = ["-m", "invariantd.daemon.lab.vmmig", "dest", "--node", "node-a", "--source-rpc",
              f"{source.addr}:7444", "--timeout", str(max(60, timeout - 90))]
    s_argv = ["-m", "invariantd.daemon.lab.vmmig", "source", "--node", "node-b", "--peer", f"node-a={dest.addr}",
              "--timeout", str(max(60, timeout - 130))]
    pair = run_pair([d_argv], [s_argv], dest=dest, source=source, variant=variant, files=files, env=env,
                    timeout=timeout)
    return MigrationRun(summary(pair.dest[0], "destination"), summary(pair.source[0], "source"), pair)
