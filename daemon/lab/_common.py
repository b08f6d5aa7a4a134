"""Shared bits of the lab: cache layout, errors, logging, timing, subprocess helpers."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import time
from pathlib import Path

log = logging.getLogger("invariantd.daemon.lab")

#: Kernel keys the lab provisions: Debian arm64 kernels, newest of each line, resolved at run time.
KERNEL_KEYS = ("6.1", "6.12", "7.x")

#: QEMU -cpu models the lab is meant for (any QEMU -cpu string is passed through as is).
CPU_MODELS = (
    "cortex-a72",
    "cortex-a72,midr=0x410fd083",
    "cortex-a72,midr=0x410fd084",
    "cortex-a72,midr=0x411fd080",
    "neoverse-n1",
    "max,pauth-impdef=on",
)

SCRIPTS = Path(__file__).resolve().parent / "scripts"

#: Last measured duration of each phase, in seconds ("provision", "provision.kernels", "boot", ...).
timings: dict[str, float] = {}


class LabError(RuntimeError):
    """The lab failed (a guest did not produce its markers, a build step failed, ...)."""


class LabUnavailable(LabError):
    """The lab cannot be set up on this machine (no archive access, not root, not Debian...)."""


def cache_dir() -> Path:
    """`$INVARIANTD_LAB_CACHE`, default `~/.cache/invariantd-lab` (never inside the git tree)."""
    env = os.environ.get("INVARIANTD_LAB_CACHE")
    p = Path(env) if env else Path.home() / ".cache" / "invariantd-lab"
    return p.expanduser().absolute()


@contextlib.contextmanager
def phase(name: str):
    """Time a phase, log it and record it in `timings`."""
    t0 = time.monotonic()
    log.info("lab: %s ...", name)
    try:
        yield
    finally:
        dt = time.monotonic() - t0
        timings[name] = dt
        log.info("lab: %s took %.2fs", name, dt)


@contextlib.contextmanager
def cache_lock(name: str = "provision"):
    """Exclusive inter-process lock on the cache (provisioning and builds)."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run(cmd, *, check=True, env=None, cwd=None, input=None, timeout=None,
        what: str | None = None) -> subprocess.CompletedProcess:
    """Run a command, capture its output (text); on failure raise LabError with its tail."""
    log.debug("lab: $ %s", " ".join(map(str, cmd)))
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        cp = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", env=full_env, cwd=cwd, input=input,
                            timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise LabError(f"{what or cmd[0]}: command not found: {e.filename}") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{what or cmd[0]}: timed out after {timeout}s") from None
    if check and cp.returncode != 0:
        tail = "\n".join(cp.stdout.splitlines()[-25:])
        raise LabError(f"{what or cmd[0]} failed (exit {cp.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return cp


def atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, str):
        data = data.encode()
    tmp.write_bytes(data)
    os.replace(tmp, path)


def source_root() -> Path:
    """The project source tree shared into the guest: the folder holding daemon/, protocol/,
    client/ (`$INVARIANTD_LAB_SOURCE` overrides)."""
    env = os.environ.get("INVARIANTD_LAB_SOURCE")
    if env:
        return Path(env).resolve()
    try:
        import invariantd.daemon as d  # the installed/editable package, if importable
        return Path(d.__file__).resolve().parent.parent
    except ImportError:
        return Path(__file__).resolve().parent.parent.parent
