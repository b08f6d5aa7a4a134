"""Boot a provisioned arm64 kernel under qemu-system-aarch64 (TCG, EL2 emulated) and run the
project's own Python code in it.

Guest layout (see scripts/init.sh): the arm64 rootfs is the 9p share `ivdroot` mounted at /,
the project source tree (the parent of the daemon/ folder) is the 9p share `ivdsrc` at
/opt/ivd/src, and a fresh per-run host directory is the read-write 9p share `ivdjob` at
/opt/ivd/job. `/opt/ivd/run/pkg` (tmpfs) holds an `invariantd/` package whose subpackages are
symlinks into /opt/ivd/src, and is the guest's PYTHONPATH; the cross-compiled libivdbatch.so is
copied to /opt/ivd/run/lib. Each command's stdout/stderr are written to files of the job share
(exact bytes, no serial console mangling); console markers carry the return codes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from . import provision as _prov
from ._common import LabError, cache_dir, cache_lock, log, phase, source_root, timings

GUEST_ROOT = "/opt/ivd"
GUEST_PYTHONPATH = f"{GUEST_ROOT}/run/pkg"
GUEST_SOURCE = f"{GUEST_ROOT}/src"
GUEST_BATCH_LIB = f"{GUEST_ROOT}/run/lib/libivdbatch.so"
GUEST_PYTHON = "/usr/bin/python3"
GUEST_JOB_DIR = f"{GUEST_ROOT}/job"      # input files appear here as in.<name>
KEEP_LOGS = 100


@dataclasses.dataclass
class GuestResult:
    """One guest python3 run.

    returncode: the program's exit status in the guest; stdout/stderr: its output, exactly;
    log_path: the boot's full console log (host); wall_seconds: host wall time of the whole
    boot (QEMU start to exit) that ran this command; run_seconds: the command's own time
    (guest clock); boot_seconds: host time from QEMU start until the guest was ready to run
    commands; kernel_release: `uname -r` in the guest."""
    returncode: int
    stdout: str
    log_path: Path
    wall_seconds: float
    kernel_release: str
    stderr: str = ""
    run_seconds: float = 0.0
    boot_seconds: float = 0.0
    argv: tuple = ()


def guest_info() -> dict:
    """Paths and environment a guest program sees."""
    return {"pythonpath": GUEST_PYTHONPATH, "source": GUEST_SOURCE, "batch_lib": GUEST_BATCH_LIB,
            "python": GUEST_PYTHON, "host_source": str(source_root())}


def _cross_build(src: Path, name: str, libs: tuple[str, ...] = ()) -> Path:
    """Cross-compile one C file of the project into an aarch64 shared object, cached by source content."""
    data = src.read_bytes()
    digest = hashlib.sha256(data + " ".join(libs).encode()).hexdigest()[:16]
    out = cache_dir() / "build" / name / digest / f"lib{name}.so"
    if out.exists():
        return out
    with cache_lock(name), phase(f"build.{name}"):
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".lib{name}.{os.getpid()}.so")
        cp = subprocess.run(["aarch64-linux-gnu-gcc", "-O2", "-std=gnu99", "-Wall", "-shared", "-fPIC", "-o", str(tmp),
                             str(src), *[f"-l{x}" for x in libs]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if cp.returncode != 0:
            raise LabError(f"aarch64-linux-gnu-gcc {src} failed:\n{cp.stdout}")
        os.replace(tmp, out)
    return out


def build_batch_lib(source: os.PathLike | str | None = None) -> Path | None:
    """Cross-compile the KVM batch C library for aarch64 (cached by source content).

    source: default <source_root>/daemon/kvm/batch.c. Returns None when the source is absent."""
    src = Path(source) if source else source_root() / "daemon" / "kvm" / "batch.c"
    if not src.exists():
        return None
    return _cross_build(src, "ivdbatch")


def build_agent_lib() -> Path:
    """Cross-compile the VMM agent (daemon/vmm/agent.c, LD_PRELOAD into the guests' QEMU) for aarch64."""
    return _cross_build(source_root() / "daemon" / "vmm" / "agent.c", "ivdagent", ("dl", "pthread"))


def _prune_logs(d: Path) -> None:
    logs = sorted(d.glob("*.log"), key=lambda p: p.stat().st_mtime)
    for p in logs[:-KEEP_LOGS]:
        p.unlink(missing_ok=True)


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


_MARK = re.compile(r"@@IVD (\w+) (.*?) ?@@")


def run_many_in_guest(kernel_key: str, cpu: str, argvs, *, timeout: float = 600,
                      env: dict | None = None, kvm_mode: str | None = None,
                      batch_source: os.PathLike | str | None = None,
                      smp: int = 2, memory_mb: int = 1024,
                      files: dict[str, bytes] | None = None,
                      net: tuple | None = None,
                      rootfs: str | os.PathLike | None = None,
                      on_line: Callable[[str], None] | None = None,
                      on_start: Callable[[subprocess.Popen], None] | None = None) -> list[GuestResult]:
    """Boot kernel `kernel_key` on QEMU `-cpu cpu` once and run `python3 *argv` for each argv,
    in order, in the guest. Returns one GuestResult per argv.

    env: extra environment for the guest programs. kvm_mode: kvm-arm.mode= (nvhe, protected...).
    batch_source: C file to cross-compile as libivdbatch.so (default daemon/kvm/batch.c).
    files: name -> bytes, readable by the guest programs as GUEST_JOB_DIR/name (inputs for the run).
    net: ("listen" | "connect", port, "10.0.0.N/24", "52:54:00:..:..:..") gives the guest one virtio-net NIC
    (eth0, static address, lo up) on a QEMU socket link to 127.0.0.1:port (README §8: loopback only; a
    "connect" QEMU needs the "listen" one already started, e.g. wait for its READY marker via on_line).
    rootfs: the guest's / (the ivdroot share): a ROOTFS_VARIANTS key of provision.py ("q10", "q11": trixie with
    Debian's QEMU, built by provision(rootfs=...)) or a directory; default the lab's bookworm tree.
    on_line: called with each console line as it arrives (from the calling thread; keep it quick).
    on_start: called with the started process (`timeout --foreground ... qemu`; its terminate() is forwarded to
    QEMU), e.g. for another thread to stop the guest early; the run then raises LabError.
    Raises LabError when the guest does not report every command (log tail in the message)."""
    argvs = [list(map(str, a)) for a in argvs]
    if not argvs:
        return []
    if net is not None:
        if len(net) != 4 or net[0] not in ("listen", "connect"):
            raise LabError(f"net={net!r}: expected ('listen'|'connect', port, 'ip/prefix', 'mac')")
        mode, port, ip, mac = net
        if not re.fullmatch(r"\d+\.\d+\.\d+\.\d+/\d+", str(ip)) or \
                not re.fullmatch(r"(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", str(mac)) or not 0 < int(port) < 65536:
            raise LabError(f"net={net!r}: bad port, address or MAC")
    info = _prov.kernel_info(kernel_key)
    if not info:
        raise LabError(f"kernel {kernel_key!r} is not provisioned (run provision()); "
                       f"available: {', '.join(_prov.versions()) or 'none'}")
    root = Path(rootfs) if isinstance(rootfs, os.PathLike) or "/" in str(rootfs or "") \
        else _prov.rootfs_dir(rootfs or "")
    if not (root / "usr/bin/python3").exists():
        raise LabError(f"the arm64 rootfs {root} is not provisioned (run provision("
                       f"{'' if not rootfs else f'rootfs=[{rootfs!r}]'}))")
    with cache_lock():
        initrd = _prov.build_initrd(kernel_key, net=net is not None)
    lib = build_batch_lib(batch_source)
    src = source_root()

    jobs = cache_dir() / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    job = Path(tempfile.mkdtemp(prefix="job-", dir=jobs))
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tag = f"{time.strftime('%Y%m%d-%H%M%S')}-{kernel_key}-{re.sub(r'[^A-Za-z0-9]+', '_', cpu)}-{job.name[4:]}"
    log_path = logs / f"{tag}.log"
    try:
        genv = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
                "PYTHONPATH": GUEST_PYTHONPATH, "PYTHONDONTWRITEBYTECODE": "1",
                "INVARIANTD_LAB_GUEST": "1", "INVARIANTD_LAB_KERNEL": kernel_key,
                "INVARIANTD_LAB_CPU": cpu}
        if lib:
            shutil.copy2(lib, job / "libivdbatch.so")
            genv["INVARIANTD_BATCH_LIB"] = GUEST_BATCH_LIB
        genv.update({k: str(v) for k, v in (env or {}).items()})
        for name, data in (files or {}).items():
            if "/" in name or name.startswith(("cmd.", ".")):
                raise LabError(f"guest input file name {name!r} is not a plain file name")
            (job / f"in.{name}").write_bytes(data)
        envs = " ".join(shlex.quote(f"{k}={v}") for k, v in genv.items())
        for i, argv in enumerate(argvs):
            (job / f"cmd.{i}").write_text(
                f"exec env -i {envs} chroot /mnt {GUEST_PYTHON} {' '.join(map(shlex.quote, argv))}\n")

        append = "console=ttyAMA0 panic=-1"
        if kvm_mode:
            append += f" kvm-arm.mode={kvm_mode}"
        if net is not None:
            append += f" ivd.ip={ip}"
        kdir = _prov.kernel_dir(kernel_key)
        vfs = "local,security_model=none"
        qemu = ["qemu-system-aarch64", "-machine", "virt,virtualization=on,gic-version=3",
                "-cpu", cpu, "-smp", str(smp), "-m", str(memory_mb),
                "-nographic", "-no-reboot", "-nic", "none",
                "-kernel", str(kdir / "vmlinuz"), "-initrd", str(initrd), "-append", append,
                "-virtfs", f"{vfs},path={root},mount_tag=ivdroot,readonly=on,id=fs0",
                "-virtfs", f"{vfs},path={src},mount_tag=ivdsrc,readonly=on,id=fs1",
                "-virtfs", f"{vfs},path={job},mount_tag=ivdjob,id=fs2"]
        if net is not None:
            qemu += ["-netdev", f"socket,id=n0,{mode}=127.0.0.1:{int(port)}",
                     "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile="]
        cmd = ["timeout", "--foreground", "-k", "10", str(int(timeout)), *qemu]
        header = (f"# kernel: {kernel_key} {info['version']} ({info['release']}), rootfs {root}\n"
                  f"# cmd: {shlex.join(cmd)}\n"
                  + "".join(f"# argv[{i}]: {shlex.join(a)}\n" for i, a in enumerate(argvs)))
        lines: list[str] = []
        marks: dict = {"rc": {}}
        t0 = time.monotonic()
        t_ready = None
        with open(log_path, "w", encoding="utf-8", errors="replace") as lf:
            lf.write(header)
            lf.flush()
            with phase("guest.boot+run"):
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
                try:
                    if on_start is not None:
                        on_start(proc)
                    for raw in proc.stdout:
                        line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
                        now = time.monotonic() - t0
                        lf.write(f"[{now:8.2f}] {line}\n")
                        lines.append(line)
                        if on_line is not None:
                            on_line(line)
                        for m in _MARK.finditer(line):
                            kind, rest = m.group(1), m.group(2)
                            kv = dict(p.split("=", 1) for p in rest.split() if "=" in p)
                            if kind == "INIT":
                                marks["release"] = kv.get("release", "")
                                timings["guest.to_init"] = now
                            elif kind == "READY":
                                t_ready = now
                                timings["guest.boot"] = now
                            elif kind == "RC" and "n" in kv and "rc" in kv:
                                marks["rc"][int(kv["n"])] = (int(kv["rc"]), float(kv.get("secs", 0)))
                            elif kind == "FAIL":
                                marks["fail"] = rest
                    proc.wait(timeout=timeout + 30)
                except BaseException:
                    proc.kill()
                    proc.wait()
                    raise
            wall = time.monotonic() - t0
            lf.write(f"# qemu exit rc={proc.returncode} wall={wall:.2f}s\n")
        _prune_logs(logs)
        missing = [i for i in range(len(argvs)) if i not in marks["rc"]]
        if missing:
            why = marks.get("fail") or ("timeout" if proc.returncode in (124, 137) else
                                        f"qemu exit {proc.returncode}")
            raise LabError(f"guest ({kernel_key}, -cpu {cpu}) reported no result for command(s) "
                           f"{missing} ({why}); log {log_path}; last 40 lines:\n{_tail(chr(10).join(lines))}")
        results = []
        for i, argv in enumerate(argvs):
            rc, secs = marks["rc"][i]
            out = (job / f"out.{i}").read_bytes().decode("utf-8", "replace") if (job / f"out.{i}").exists() else ""
            err = (job / f"err.{i}").read_bytes().decode("utf-8", "replace") if (job / f"err.{i}").exists() else ""
            results.append(GuestResult(returncode=rc, stdout=out, log_path=log_path, wall_seconds=wall,
                                       kernel_release=marks.get("release", ""), stderr=err,
                                       run_seconds=secs, boot_seconds=t_ready or 0.0, argv=tuple(argv)))
        with open(log_path, "a", encoding="utf-8", errors="replace") as lf:
            for i, r in enumerate(results):
                lf.write(f"# --- command {i} rc={r.returncode} secs={r.run_seconds}\n# stdout:\n{r.stdout}"
                         f"\n# stderr:\n{r.stderr}\n")
        log.info("lab: %s -cpu %s: %d command(s), boot %.2fs, wall %.2fs, rc %s", kernel_key, cpu,
                 len(argvs), t_ready or -1, wall, [r.returncode for r in results])
        return results
    finally:
        shutil.rmtree(job, ignore_errors=True)


def run_in_guest(kernel_key: str, cpu: str, argv, *, timeout: float = 600, **kw) -> GuestResult:
    """Boot kernel `kernel_key` on QEMU `-cpu cpu` and run `python3 *argv` in the guest.

    Example: run_in_guest("6.12", "cortex-a72", ["-m", "invariantd.client.cli", "probe", "--json"]).
    Keyword arguments as run_many_in_guest."""
    return run_many_in_guest(kernel_key, cpu, [argv], timeout=timeout, **kw)[0]
