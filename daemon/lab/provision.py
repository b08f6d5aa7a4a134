"""Provisioning: host tools, Debian arm64 kernels, busybox, the arm64 Python rootfs, initramfs.

Everything goes to the cache (`cache_dir()`):

    apt/            private apt state (sources, lists) used only to *download* arm64 packages;
                    the host's /etc/apt and dpkg architectures are never changed
    debs/           downloaded .debs (kept: they are the fallback when the archive drops a version)
    kernels/KEY/    vmlinuz, config, modules/, VERSION (Debian version), kernel.json
    busybox/        busybox-static:arm64, extracted
    rootfs/         arm64 Debian bookworm tree (mmdebstrap --variant=extract), python3 + cffi
    rootfs-q10/     on demand (provision(rootfs=...)): trixie trees with Debian's arm64 QEMU 10.0 / 11.1
    rootfs-q11/     (ROOTFS_VARIANTS), python3.13 + the project's cp313 wheels
    build/          initrd-KEY.cpio.gz, libivdbatch.so builds
    logs/           one console log per guest boot
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._common import (KERNEL_KEYS, SCRIPTS, LabError, LabUnavailable, atomic_write, cache_dir,
                      cache_lock, log, phase, run, source_root)

HOST_PACKAGES = ("qemu-system-arm", "ipxe-qemu", "cpio", "xz-utils", "zstd", "e2fsprogs",
                 "mmdebstrap", "gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross")
HOST_COMMANDS = ("qemu-system-aarch64", "cpio", "xz", "zstd", "mke2fs", "mmdebstrap",
                 "aarch64-linux-gnu-gcc", "dpkg-deb", "gzip", "timeout")

#: Guest modules (plus their dependencies) for the 9p/virtio shares; built-ins are skipped.
GUEST_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
#: Added for guests with a NIC (run_many_in_guest(net=...)): a separate initrd, initrd-KEY-net.cpio.gz.
NET_MODULES = ("virtio_net",)   # + failover, net_failover via its depends=

REFRESH_AFTER = 7 * 86400     # re-resolve the archive's newest kernels after this many seconds

SUITES = ("bookworm", "bookworm-updates", "trixie", "trixie-updates", "trixie-backports", "sid")
SECURITY_SUITES = ("bookworm-security", "trixie-security")


# --------------------------------------------------------------------------- host tools

def _missing_host_packages() -> list[str]:
    cp = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *HOST_PACKAGES],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ok = {ln.split()[0] for ln in cp.stdout.splitlines() if len(ln.split()) > 1 and ln.split()[1] == "ii"}
    return [p for p in HOST_PACKAGES if p not in ok]


def ensure_host_tools() -> None:
    """apt-get install the host packages the lab needs, only those that are missing."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-query"):
        missing = [c for c in HOST_COMMANDS if not shutil.which(c)]
        if missing:
            raise LabUnavailable(f"not a Debian-like host (no apt-get) and missing: {', '.join(missing)}")
        return
    missing = _missing_host_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise LabUnavailable(f"host packages missing and not root to install them: {' '.join(missing)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    with phase("provision.host_packages"):
        cp = run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=False, env=env)
        if cp.returncode != 0:
            run(["apt-get", "update"], check=False, env=env)
            cp = run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=False, env=env)
        if cp.returncode != 0:
            tail = "\n".join(cp.stdout.splitlines()[-15:])
            raise LabUnavailable(f"apt-get install {' '.join(missing)} failed:\n{tail}")


# --------------------------------------------------------------------------- private apt

def _host_mirrors() -> tuple[str, str]:
    """(debian archive URI, security archive URI) as the host's apt sources use them."""
    main = os.environ.get("DEBIAN_MIRROR", "").rstrip("/")
    sec = os.environ.get("DEBIAN_SECURITY_MIRROR", "").rstrip("/")
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
             *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    entries: list[tuple[list[str], list[str]]] = []   # (uris, suites)
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for ln in stanza.splitlines():
                    m = re.match(r"^([A-Za-z-]+):\s*(.*)$", ln)
                    if m:
                        fields[m.group(1).lower()] = m.group(2).split()
                if "uris" in fields and "suites" in fields and fields.get("enabled", ["yes"]) != ["no"]:
                    entries.append((fields["uris"], fields["suites"]))
        else:
            for ln in text.splitlines():
                ln = re.sub(r"\[[^]]*\]", " ", ln.split("#", 1)[0]).split()
                if len(ln) >= 3 and ln[0] == "deb":
                    entries.append(([ln[1]], [ln[2]]))
    debian_suite = re.compile(r"^(bookworm|trixie|forky|sid|stable|testing|unstable|oldstable)")
    for uris, suites in entries:
        for s in suites:
            if not debian_suite.match(s):
                continue
            for u in uris:
                u = u.rstrip("/")
                if s.endswith("-security"):
                    sec = sec or u
                else:
                    main = main or u
    main = main or "http://deb.debian.org/debian"
    sec = sec or main + "-security"
    return main, sec


class _Apt:
    """apt-get / apt-cache with a private state under CACHE/apt: arm64 lists of several suites."""

    def __init__(self, root: Path):
        self.root = root
        self.mirror, self.security = _host_mirrors()
        for d in ("lists/partial", "cache/archives/partial", "parts"):
            (root / d).mkdir(parents=True, exist_ok=True)
        kr = "/usr/share/keyrings/debian-archive-keyring.gpg"
        opts = f"[arch=arm64 signed-by={kr}]" if Path(kr).exists() else "[arch=arm64]"
        lines = [f"deb {opts} {self.mirror} {s} main" for s in SUITES]
        lines += [f"deb {opts} {self.security} {s} main" for s in SECURITY_SUITES]
        atomic_write(root / "sources.list", "\n".join(lines) + "\n")
        self.opts = [
            "-o", f"Dir::Etc::SourceList={root / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={root / 'parts'}",
            "-o", f"Dir::State::Lists={root / 'lists'}",
            "-o", f"Dir::Cache={root / 'cache'}",
            "-o", "APT::Architectures::=arm64",
            "-o", "Acquire::Languages=none",
            "-o", "APT::Sandbox::User=root",
            "-o", "Acquire::Retries=3",
            "-o", "Acquire::http::Timeout=30",
        ]

    def update(self) -> None:
        cp = run(["apt-get", *self.opts, "update"], check=False, timeout=600)
        errs = [ln for ln in cp.stdout.splitlines() if ln.startswith(("E:", "Err:", "W: Failed", "W: Some"))]
        if cp.returncode != 0 or errs:
            log.warning("lab: apt-get update (%s) reported problems:\n%s", self.mirror, "\n".join(errs[-10:]))
        if not self.madison("linux-image-arm64"):
            tail = "\n".join(cp.stdout.splitlines()[-10:])
            raise LabUnavailable(f"the Debian archive ({self.mirror}) cannot be reached or offers no "
                                 f"arm64 kernels:\n{tail}")

    def madison(self, pkg: str) -> list[tuple[str, str]]:
        """[(version, suite line)] for pkg:arm64 in our lists."""
        cp = run(["apt-cache", *self.opts, "madison", f"{pkg}:arm64"], check=False)
        out = []
        for ln in cp.stdout.splitlines():
            parts = [p.strip() for p in ln.split("|")]
            if len(parts) >= 3 and parts[0].split(":")[0] == pkg:
                out.append((parts[1], parts[2]))
        return out

    def depends(self, pkg: str, version: str) -> list[str]:
        cp = run(["apt-cache", *self.opts, "show", f"{pkg}:arm64={version}"], what="apt-cache show")
        for ln in cp.stdout.splitlines():
            if ln.startswith("Depends:"):
                return [d.strip().split()[0] for alt in ln[8:].split(",") for d in alt.split("|")]
        return []

    def download(self, spec: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.deb"))
        run(["apt-get", *self.opts, "download", spec], cwd=dest, timeout=1800, what=f"apt-get download {spec}")
        new = sorted(set(dest.glob("*.deb")) - before, key=lambda p: p.stat().st_mtime)
        if new:
            return new[-1]
        name, _, ver = spec.partition("=")
        name = name.split(":")[0]
        cands = sorted(dest.glob(f"{name}_{_deb_quote(ver) if ver else '*'}_arm64.deb"))
        if not cands:
            raise LabError(f"apt-get download {spec}: no .deb appeared in {dest}")
        return cands[-1]


def _deb_quote(version: str) -> str:
    return version.replace(":", "%3a")


def _vercmp(a: str, b: str) -> int:
    if a == b:
        return 0
    if subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0:
        return -1
    return 1


def _newest(versions, pattern: str) -> str | None:
    vs = sorted({v for v in versions if re.match(pattern, v)}, key=functools.cmp_to_key(_vercmp))
    return vs[-1] if vs else None


#: key -> regex on the linux-image-arm64 (meta package) version
KERNEL_PATTERNS = {"6.1": r"^6\.1\.", "6.12": r"^6\.12\.", "7.x": r"^([7-9]|[1-9][0-9])\."}


# --------------------------------------------------------------------------- kernels

def kernel_dir(key: str) -> Path:
    return cache_dir() / "kernels" / key


def kernel_info(key: str) -> dict | None:
    """Metadata of the cached kernel `key` (version, release, packages), or None."""
    f = kernel_dir(key) / "kernel.json"
    if not f.exists() or not (kernel_dir(key) / "vmlinuz").exists():
        return None
    return json.loads(f.read_text())


def versions() -> dict[str, dict]:
    """{key: kernel_info} of the provisioned kernels."""
    out = {}
    for key in KERNEL_KEYS:
        info = kernel_info(key)
        if info:
            out[key] = info
    return out


def _fetch_kernel(apt: _Apt, key: str, meta_version: str) -> None:
    debs = cache_dir() / "debs"
    img = next((d for d in apt.depends("linux-image-arm64", meta_version)
                if re.match(r"^linux-image-[0-9].*-arm64$", d)), None)
    if not img:
        raise LabError(f"linux-image-arm64={meta_version}: no concrete image package in Depends")
    release = img[len("linux-image-"):]
    pkgs = [img]
    # 7.x splits the image into linux-binary-* + linux-modules-* + linux-base-*
    pkgs += [d for d in apt.depends(img, meta_version)
             if re.match(r"^linux-(binary|modules|base)-", d) and "unsigned" not in d]
    files = []
    with phase(f"provision.kernel[{key}].download"):
        for p in pkgs:
            cached = debs / f"{p}_{_deb_quote(meta_version)}_arm64.deb"
            files.append(cached if cached.exists() else apt.download(f"{p}:arm64={meta_version}", debs))
    with phase(f"provision.kernel[{key}].extract"):
        _extract_kernel(key, files, {"key": key, "version": meta_version, "release": release,
                                     "packages": pkgs, "debs": [f.name for f in files],
                                     "mirror": apt.mirror, "fetched": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _extract_kernel(key: str, files: list[Path], info: dict) -> None:
    release = info["release"]
    kroot = cache_dir() / "kernels"
    kroot.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".x-{key}-", dir=kroot))
    try:
        x = tmp / "x"
        for f in files:
            run(["dpkg-deb", "-x", f, x], what="dpkg-deb -x")
        vml = [p for p in x.rglob("vmlinuz*") if p.is_file()]
        cfg = [p for p in x.rglob(f"config-{release}") if p.is_file()] + \
              [p for p in x.rglob("config") if p.is_file() and p.parent.name == release]
        mods = [p for p in x.rglob(release) if p.is_dir() and p.parent.name == "modules"]
        if not vml or not cfg or not mods:
            raise LabError(f"kernel {key} {info['version']}: vmlinuz/config/modules not found in {files}")
        out = tmp / "k"
        out.mkdir()
        shutil.move(str(vml[0]), out / "vmlinuz")
        shutil.move(str(cfg[0]), out / "config")
        shutil.move(str(mods[0]), out / "modules")
        (out / "VERSION").write_text(info["version"] + "\n")
        (out / "kernel.json").write_text(json.dumps(info, indent=2) + "\n")
        dest = kroot / key
        old = kroot / f".old-{key}-{os.getpid()}"
        if dest.exists():
            dest.rename(old)
        out.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        config = (dest / "config").read_text(errors="replace")
        log.info("lab: kernel %s = %s (%s), CONFIG_KVM=%s", key, info["version"], release,
                 (re.search(r"^CONFIG_KVM=(\S+)", config, re.M) or [None, "?"])[1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _provision_kernels(keys, refresh: bool) -> None:
    stamp = cache_dir() / "kernels" / ".resolved"
    have = all(kernel_info(k) for k in keys)
    fresh = stamp.exists() and time.time() - stamp.stat().st_mtime < REFRESH_AFTER
    need_bb = not _busybox_path()
    if have and fresh and not refresh and not need_bb:
        return
    apt = _Apt(cache_dir() / "apt")
    try:
        with phase("provision.apt_update"):
            apt.update()
    except LabUnavailable as e:
        if have and not need_bb:
            log.warning("lab: cannot refresh kernel versions, using the cached ones: %s", e)
            if stamp.exists():  # retry in a day rather than on every provision()
                t = time.time() - REFRESH_AFTER + 86400
                os.utime(stamp, (t, t))
            return
        raise
    metas = [v for v, _ in apt.madison("linux-image-arm64")]
    resolved = {}
    for key in keys:
        want = _newest(metas, KERNEL_PATTERNS[key])
        cur = kernel_info(key)
        if not want:
            if cur:
                log.warning("lab: archive offers no %s kernel any more, using cached %s", key, cur["version"])
                continue
            raise LabUnavailable(f"the archive offers no arm64 {key} kernel (have: {', '.join(metas)})")
        resolved[key] = want
        if cur and cur["version"] == want:
            continue
        try:
            _fetch_kernel(apt, key, want)
        except LabError as e:
            if cur:
                log.warning("lab: fetching kernel %s %s failed, using cached %s: %s", key, want, cur["version"], e)
                continue
            raise
    if need_bb:
        _fetch_busybox(apt)
    atomic_write(stamp, json.dumps(resolved, indent=2) + "\n")


# --------------------------------------------------------------------------- busybox

def _busybox_path() -> Path | None:
    for p in ("usr/bin/busybox", "bin/busybox"):
        f = cache_dir() / "busybox" / p
        if f.is_file():
            return f
    return None


def _fetch_busybox(apt: _Apt) -> None:
    with phase("provision.busybox"):
        vers = apt.madison("busybox-static")
        if not vers:
            raise LabUnavailable("the archive offers no busybox-static:arm64")
        pref = [v for v, s in vers if f" {ROOTFS_SUITE}/" in f" {s}"] or [v for v, _ in vers]
        deb = apt.download(f"busybox-static:arm64={pref[0]}", cache_dir() / "debs")
        tmp = Path(tempfile.mkdtemp(prefix=".bb-", dir=cache_dir()))
        run(["dpkg-deb", "-x", deb, tmp], what="dpkg-deb -x busybox")
        dest = cache_dir() / "busybox"
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)


# --------------------------------------------------------------------------- rootfs

@dataclasses.dataclass(frozen=True)
class RootfsSpec:
    """One arm64 guest userland: a Debian `suite` tree (mmdebstrap --variant=extract) with `packages` (apt
    `name` or `name/suite` pins), the project's runtime wheels for its `python` ("3.11") built against its
    `glibc` ((2, 36)). variant: "" = the lab's default tree (cache_dir()/rootfs), else cache_dir()/rootfs-VARIANT.
    extra_suites: further suites of the same archive in the tree's sources (e.g. trixie-backports).
    layout: bump to force a rebuild of this tree."""
    variant: str
    suite: str
    packages: tuple[str, ...]
    python: str
    glibc: tuple[int, int]
    layout: str
    extra_suites: tuple[str, ...] = ()
    description: str = ""

    @property
    def path(self) -> Path:
        return cache_dir() / (f"rootfs-{self.variant}" if self.variant else "rootfs")

    @property
    def site_dir(self) -> Path:
        """Debian's python3 searches /usr/local/lib/pythonX.Y/dist-packages first."""
        return self.path / f"usr/local/lib/python{self.python}/dist-packages"

    @property
    def platforms(self) -> tuple[str, ...]:
        """manylinux tags of aarch64 wheels this tree's glibc can load, newest first."""
        major, minor = self.glibc
        return tuple(f"manylinux_{major}_{m}_aarch64" for m in range(minor, 16, -1)) + ("manylinux2014_aarch64",)

    def stamp(self) -> str:
        return f"{self.layout} {self.suite} {','.join(self.packages)}"


ROOTFS_BASE = ("python3", "python3-cffi", "libc-bin", "libstdc++6")  # libstdc++6: pycapnp's C++ core
_QEMU_11 = ("qemu-system-arm/trixie-backports", "qemu-system-common/trixie-backports",
            "qemu-system-data/trixie-backports")   # every QEMU binary package pinned, else unmet dependencies

#: The lab's guest userlands. "": bookworm (python 3.11), every guest by default. "q10" / "q11": trixie
#: (python 3.13) with Debian's arm64 QEMU 10.0 (trixie) / 11.1 (trixie-backports), built on demand
#: (provision(rootfs=...), daemon/lab/qemu.py) for nested -accel kvm runs inside the guests.
ROOTFS_VARIANTS: dict[str, RootfsSpec] = {
    "": RootfsSpec("", "bookworm", ROOTFS_BASE, "3.11", (2, 36), "2", description="bookworm, python3.11"),
    "q10": RootfsSpec("q10", "trixie", ROOTFS_BASE + ("qemu-system-arm",), "3.13", (2, 41), "1",
                      description="trixie, python3.13, qemu-system-arm 10.0 (trixie)"),
    "q11": RootfsSpec("q11", "trixie", ROOTFS_BASE + _QEMU_11, "3.13", (2, 41), "1",
                      extra_suites=("trixie-backports",),
                      description="trixie, python3.13, qemu-system-arm 11.1 (trixie-backports)"),
}
ROOTFS_PACKAGES = ROOTFS_VARIANTS[""].packages
ROOTFS_SUITE = ROOTFS_VARIANTS[""].suite
ROOTFS_LAYOUT = ROOTFS_VARIANTS[""].layout


def rootfs_spec(variant: str = "") -> RootfsSpec:
    try:
        return ROOTFS_VARIANTS[variant or ""]
    except KeyError:
        raise LabError(f"unknown rootfs variant {variant!r}; known: "
                       f"{', '.join(repr(v) for v in ROOTFS_VARIANTS)}") from None


def rootfs_dir(variant: str = "") -> Path:
    return rootfs_spec(variant).path


def _rootfs_ok(spec: RootfsSpec) -> bool:
    st = spec.path / ".ivd-rootfs"
    return st.exists() and st.read_text().split()[0] == spec.layout and (spec.path / "usr/bin/python3").exists()


def _host_python(version: str) -> str | None:
    """A host interpreter of the guest's minor version ("3.11"), to precompile its .pyc (they are architecture
    independent); None when the host has none."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    cands = [sys.executable, shutil.which(f"python{version}") or "", shutil.which("python3") or "",
             *map(str, sorted(pyenv.glob(f"{version}*/bin/python{version}"), reverse=True))]
    for hp in cands:
        if not hp or not os.access(hp, os.X_OK):
            continue
        v = subprocess.run([hp, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        if v == version:
            return hp
    return None


def _provision_rootfs(spec: RootfsSpec | None = None) -> None:
    spec = spec or ROOTFS_VARIANTS[""]
    if _rootfs_ok(spec):
        return
    if os.geteuid() != 0:
        raise LabUnavailable("building the arm64 rootfs (mmdebstrap --mode=root) needs root")
    mirror, _ = _host_mirrors()
    with phase(f"provision.{spec.path.name}"):
        tmp = cache_dir() / f".{spec.path.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        sources = [f"deb {mirror} {s} main" for s in (spec.suite, *spec.extra_suites)]
        cp = run(["mmdebstrap", "--mode=root", "--variant=extract", "--architectures=arm64",
                  "--include=" + ",".join(spec.packages), spec.suite, tmp, *sources], check=False, timeout=1800)
        if cp.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = "\n".join(cp.stdout.splitlines()[-15:])
            raise LabUnavailable(f"mmdebstrap of the arm64 {spec.suite} rootfs from {mirror} failed:\n{tail}")
        # --variant=extract runs no maintainer scripts: a merged-/usr suite (trixie) ships only usr/{bin,sbin,lib},
        # and without the top-level links chroot finds no ELF interpreter (/lib/ld-linux-aarch64.so.1)
        for d in ("bin", "sbin", "lib"):
            if not os.path.lexists(tmp / d) and (tmp / "usr" / d).is_dir():
                (tmp / d).symlink_to(f"usr/{d}")
        for d in ("proc", "sys", "dev", "tmp", "opt/ivd/src", "opt/ivd/job", "opt/ivd/run"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        # .pyc are architecture independent: precompile the guest's stdlib with a host python of
        # the same minor version, else every guest run byte-compiles what it imports
        hp = _host_python(spec.python)
        if hp:
            with phase(f"provision.{spec.path.name}.compileall"):
                run([hp, "-m", "compileall", "-q", "-j0", "-s", tmp, "-p", "/",
                     tmp / f"usr/lib/python{spec.python}", tmp / "usr/lib/python3/dist-packages"], check=False)
        else:
            log.warning("lab: no host python%s to precompile the guest rootfs %s; guest runs will byte-compile",
                        spec.python, spec.path.name)
        (tmp / ".ivd-rootfs").write_text(spec.stamp() + "\n")
        _replace_dir(tmp, spec.path)


def _replace_dir(new: Path, dest: Path) -> None:
    """Put the finished tree `new` at `dest`: renames first, delete the old tree last (a guest that still has the
    old one mounted keeps reading it until then)."""
    old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- guest Python packages

GUEST_PLATFORMS = ROOTFS_VARIANTS[""].platforms    # bookworm arm64: glibc 2.36


def runtime_requirements() -> list[str]:
    """The project's runtime dependencies (pyproject [project] dependencies, no extras): from the source tree
    the guest runs (its pyproject.toml: current even when the editable install's metadata is older), else
    from the installed package's metadata."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, requires

    pyproject = source_root() / "pyproject.toml"
    if pyproject.is_file():
        try:
            return sorted(tomllib.loads(pyproject.read_text())["project"]["dependencies"])
        except (tomllib.TOMLDecodeError, KeyError) as e:
            raise LabUnavailable(f"{pyproject}: cannot read [project] dependencies ({e})") from None
    try:
        reqs = requires("invariantd") or []
    except PackageNotFoundError:
        raise LabUnavailable("invariantd is not installed (pip install -e .): the guest's Python packages "
                             "come from its declared dependencies") from None
    return sorted(r for r in reqs if "extra ==" not in r)


def guest_site_dir(variant: str = "") -> Path:
    return rootfs_spec(variant).site_dir


def _provision_guest_packages(spec: RootfsSpec | None = None) -> None:
    """The project's runtime dependencies as aarch64 wheels for the tree's Python (cp311, cp313...) from PyPI,
    unpacked into the guest rootfs's site dir. Redone when the list changes."""
    spec = spec or ROOTFS_VARIANTS[""]
    reqs = runtime_requirements()
    stamp = spec.path / ".ivd-pydeps"
    want = "\n".join(reqs) + "\n"
    if stamp.exists() and stamp.read_text() == want:
        return
    site = spec.site_dir
    cpv = "cp" + spec.python.replace(".", "")
    with phase(f"provision.guest_packages[{spec.variant or 'default'}]"):
        tmp = site.with_name(f".dist-packages-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
               "--no-compile",                  # compiled below by a host python of the guest's version
               "--python-version", spec.python, "--implementation", "cp", "--abi", cpv, "--abi", "abi3",
               "--abi", "none", "--target", str(tmp)]
        for plat in spec.platforms:
            cmd += ["--platform", plat]
        cp = run(cmd + reqs, check=False, timeout=900)
        if cp.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = "\n".join(cp.stdout.splitlines()[-15:])
            raise LabUnavailable(f"pip could not fetch aarch64 {cpv} wheels for {' '.join(reqs)}:\n{tail}")
        hp = _host_python(spec.python)
        if hp:
            run([hp, "-m", "compileall", "-q", "-j0", "-s", str(tmp), "-p", str(Path("/") / site.relative_to(spec.path)),
                 str(tmp)], check=False)
        site.parent.mkdir(parents=True, exist_ok=True)
        _replace_dir(tmp, site)
        stamp.write_text(want)


def provision_rootfs(variant: str = "") -> Path:
    """Build (once; idempotent, under the cache lock) the guest userland `variant` (ROOTFS_VARIANTS) with the
    project's runtime wheels; -> its directory (run_many_in_guest(rootfs=variant) shares it as the guest's /)."""
    spec = rootfs_spec(variant)
    ensure_host_tools()
    with cache_lock():
        _provision_rootfs(spec)
        _provision_guest_packages(spec)
    return spec.path


def rootfs_package_version(package: str, variant: str = "") -> str | None:
    """The Debian version of `package` in the tree `variant` (e.g. "1:11.1.3+ds-1~bpo13+1" for qemu-system-arm), from
    its changelog (--variant=extract leaves dpkg's status empty); None when absent."""
    f = rootfs_dir(variant) / "usr/share/doc" / package / "changelog.Debian.gz"
    try:
        with gzip.open(f, "rt", errors="replace") as fh:
            m = re.match(r"\S+ \(([^)]+)\)", fh.readline())
    except OSError:
        return None
    return m.group(1) if m else None


# --------------------------------------------------------------------------- initramfs

def _modcat(path: Path) -> bytes:
    if path.name.endswith(".xz"):
        return subprocess.run(["xz", "-dc", path], stdout=subprocess.PIPE, check=True).stdout
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-qdc", path], stdout=subprocess.PIPE, check=True).stdout
    if path.name.endswith(".gz"):
        return subprocess.run(["gzip", "-dc", path], stdout=subprocess.PIPE, check=True).stdout
    return path.read_bytes()


def _module_order(moddir: Path, wanted) -> list[tuple[str, bytes]]:
    """[(file name, decompressed .ko)] of the wanted modules plus dependencies, load order.

    Debian's debs ship no modules.dep, so dependencies come from each module's modinfo
    "depends=" string."""
    index = {}
    for p in moddir.rglob("*.ko*"):
        index[p.name.split(".ko")[0].replace("-", "_")] = p
    builtin = ""
    if (moddir / "modules.builtin").exists():
        builtin = (moddir / "modules.builtin").read_text()
    order: list[tuple[str, bytes]] = []
    seen = set()

    def add(name: str) -> None:
        n = name.replace("-", "_")
        if n in seen:
            return
        seen.add(n)
        p = index.get(n)
        if p is None:
            if re.search(rf"/{re.escape(name)}\.ko", builtin) or re.search(rf"/{re.escape(n)}\.ko", builtin):
                return
            raise LabError(f"kernel module {name} neither in {moddir} nor built in")
        data = _modcat(p)
        m = re.search(rb"(?:^|\0)depends=([^\0]*)", data)
        for d in (m.group(1).decode().split(",") if m else []):
            if d:
                add(d)
        order.append((p.name.split(".ko")[0] + ".ko", data))

    for w in wanted:
        add(w)
    return order


def _initrd_stamp(key: str, modules=GUEST_MODULES) -> str:
    h = hashlib.sha256()
    h.update((SCRIPTS / "init.sh").read_bytes())
    h.update((kernel_dir(key) / "VERSION").read_bytes())
    h.update(",".join(modules).encode())
    bb = _busybox_path()
    h.update(str(bb.stat().st_size if bb else 0).encode())
    return h.hexdigest()[:16]


def initrd_path(key: str, net: bool = False) -> Path:
    return cache_dir() / "build" / f"initrd-{key}{'-net' if net else ''}.cpio.gz"


def build_initrd(key: str, net: bool = False) -> Path:
    """busybox + /init (scripts/init.sh) + the 9p/virtio modules of kernel `key`; cached.
    net: also the virtio-net modules (NET_MODULES), as a separate initrd."""
    out = initrd_path(key, net)
    stamp = out.with_suffix(".stamp")
    if not kernel_info(key):
        raise LabError(f"kernel {key} is not provisioned")
    modules = GUEST_MODULES + NET_MODULES if net else GUEST_MODULES
    want = _initrd_stamp(key, modules)
    if out.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return out
    bb = _busybox_path()
    if not bb:
        raise LabError("busybox-static:arm64 is not provisioned")
    with phase(f"provision.initrd[{key}]"):
        out.parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=".initrd-", dir=out.parent))
        try:
            for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "mnt",
                      "lib/modules", "etc"):
                (root / d).mkdir(parents=True, exist_ok=True)
            shutil.copy2(bb, root / "bin/busybox")
            (root / "bin/sh").symlink_to("busybox")
            shutil.copy2(SCRIPTS / "init.sh", root / "init")
            (root / "init").chmod(0o755)
            names = []
            for name, data in _module_order(kernel_dir(key) / "modules", modules):
                (root / "lib/modules" / name).write_bytes(data)
                names.append(name)
            (root / "modules.list").write_text("".join(n + "\n" for n in names))
            files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
            cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root,
                                  input=(".\n" + "\n".join(files) + "\n").encode(),
                                  stdout=subprocess.PIPE, check=True).stdout
            gz = subprocess.run(["gzip", "-1"], input=cpio, stdout=subprocess.PIPE, check=True).stdout
            atomic_write(out, gz)
            atomic_write(stamp, want + "\n")
            log.info("lab: initrd %s: %d bytes, modules: %s", key, len(gz), " ".join(names) or "-")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- entry point

def provision(kernels=None, *, refresh: bool = False, rootfs=("",)) -> dict[str, dict]:
    """Make the lab ready; idempotent and cached. Returns `versions()`.

    kernels: subset of KERNEL_KEYS (default: all). refresh: re-resolve the archive's newest
    kernels now (otherwise done when the last resolution is older than a week).
    rootfs: the guest userlands to make ready (ROOTFS_VARIANTS keys): default the bookworm tree every guest
    uses; ("q11",) for the trixie tree with QEMU 11.1 only (run_many_in_guest(rootfs="q11")).
    Raises LabUnavailable when the machine cannot host the lab (archive unreachable, ...)."""
    keys = tuple(kernels) if kernels else KERNEL_KEYS
    bad = [k for k in keys if k not in KERNEL_KEYS]
    if bad:
        raise LabError(f"unknown kernel key(s) {bad}; known: {', '.join(KERNEL_KEYS)}")
    with phase("provision"):
        if sys.platform != "linux":
            raise LabUnavailable("the lab needs a Linux host")
        ensure_host_tools()
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        with cache_lock():
            with phase("provision.kernels"):
                _provision_kernels(keys, refresh)
            for variant in dict.fromkeys(rootfs):
                spec = rootfs_spec(variant)
                _provision_rootfs(spec)
                _provision_guest_packages(spec)
            for k in keys:
                build_initrd(k)
    return versions()
