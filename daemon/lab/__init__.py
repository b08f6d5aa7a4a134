"""invariantd arm64 KVM lab: real Debian arm64 kernels under qemu-system-aarch64 (TCG, EL2
emulated), whose /dev/kvm lets the project's own code drive the real arm64 KVM uapi.

    from invariantd.daemon import lab
    lab.provision()                                   # idempotent; LabUnavailable if impossible
    r = lab.run_in_guest("6.12", "cortex-a72", ["-m", "invariantd.client.cli", "probe", "--json"])
    r.returncode, r.stdout, r.kernel_release, r.log_path
    rs = lab.run_many_in_guest("7.x", "neoverse-n1", [argv1, argv2])   # one boot, several runs

CLI: python -m invariantd.daemon.lab provision | versions | run KERNEL CPU -- ARGS...
Cache: $INVARIANTD_LAB_CACHE (default ~/.cache/invariantd-lab). Stdlib only.
"""
from ._common import (CPU_MODELS, KERNEL_KEYS, LabError, LabUnavailable, cache_dir, timings)
from .guest import (GuestResult, build_batch_lib, guest_info, run_in_guest, run_many_in_guest,
                    source_root)
from .provision import kernel_info, provision, versions

__all__ = ["CPU_MODELS", "KERNEL_KEYS", "GuestResult", "LabError", "LabUnavailable", "build_batch_lib",
           "cache_dir", "guest_info", "kernel_info", "provision", "run_in_guest", "run_many_in_guest",
           "source_root", "timings", "versions"]
