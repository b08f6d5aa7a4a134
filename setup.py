"""Package layout and the C batch library.

The fixed top-level folders daemon/, protocol/ and client/ install as invariantd.daemon,
invariantd.protocol and invariantd.client (generic names like `daemon` would collide once installed).
The C libraries (daemon/kvm/batch.c; daemon/vmm/agent.c, the VMM agent) are built as an extension-shaped shared object that Python never
imports: the binding loads it with cffi's dlopen.
"""
import os

from setuptools import Extension, setup

ROOTS = {"daemon": "invariantd.daemon", "protocol": "invariantd.protocol", "client": "invariantd.client"}


def packages():
    found = []
    for folder, name in ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if "__init__.py" in filenames:
                found.append(name + dirpath[len(folder):].replace(os.sep, "."))
    return found


PKGS = packages()
setup(
    packages=PKGS,
    package_dir={p: p.replace("invariantd.", "", 1).replace(".", "/") for p in PKGS},
    ext_modules=[Extension("invariantd.daemon.kvm._ivdbatch", ["daemon/kvm/batch.c"],
                           extra_compile_args=["-O2", "-std=c99", "-Wall"]),
                 # the VMM agent (LD_PRELOAD into QEMU): a shared object Python never imports either
                 Extension("invariantd.daemon.vmm._ivdagent", ["daemon/vmm/agent.c"],
                           extra_compile_args=["-O2", "-std=gnu99", "-Wall"], libraries=["dl", "pthread"])],
)
