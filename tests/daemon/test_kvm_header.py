"""The ioctl numbers: protocol/kvmabi.py computes them, the C code takes them from <linux/kvm.h>; they must agree.

The values are read out of the compiler's assembly for an array of the header's constants (no program runs, so the
arm64 header can be checked with the cross compiler the lab installs: KVM_ARM_* need arm64's struct sizes).
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from invariantd.protocol import kvmabi

ARM_ONLY = {n for n in kvmabi.IOCTLS if n.startswith("KVM_ARM_")}


MISSING = 0xFFFFFFFFFFFFFFFF      # a name this header does not define yet (an older kernel's headers)


def header_values(cc: str, names: list[str]) -> dict[str, int]:
    """{name: value} for each name the header defines (the others are left out)."""
    items = "".join(f"#ifdef {n}\n  {n},\n#else\n  {MISSING}ULL,\n#endif\n" for n in names)
    src = "#include <linux/kvm.h>\nconst unsigned long long ivd_v[] = {\n" + items + "};\n"
    asm = subprocess.run([cc, "-S", "-O0", "-o", "-", "-x", "c", "-"], input=src, capture_output=True, text=True,
                         check=True).stdout
    body = asm[asm.index("ivd_v:"):]
    vals = [int(v, 0) for v in re.findall(r"\.(?:quad|xword|8byte|dword)\s+(-?(?:0x)?[0-9a-fA-F]+)", body)][:len(names)]
    return {n: v & MISSING for n, v in zip(names, vals) if v & MISSING != MISSING}


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler (the KVM batch library needs one to build)")
def test_generic_ioctls_match_the_host_header():
    names = sorted(set(kvmabi.IOCTLS) - ARM_ONLY)
    got = header_values("cc", names)
    assert got == {n: kvmabi.IOCTLS[n] for n in got} and {"KVM_GET_ONE_REG", "KVM_SET_ONE_REG"} <= set(got)


@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-gcc"), reason="no arm64 cross compiler (the lab installs it)")
def test_every_ioctl_matches_the_arm64_header():
    names = sorted(kvmabi.IOCTLS)
    got = header_values("aarch64-linux-gnu-gcc", names)
    assert got == {n: kvmabi.IOCTLS[n] for n in got}
    # Debian 12's cross headers are 6.1's: only what came later may be missing
    assert set(names) - set(got) <= {"KVM_ARM_GET_REG_WRITABLE_MASKS"}, set(names) - set(got)


def test_the_c_library_takes_its_ioctl_numbers_from_the_header():
    from importlib import resources
    src = resources.files("invariantd.daemon").joinpath("kvm", "batch.c").read_text()
    assert "#include <linux/kvm.h>" in src and not re.search(r"0x[0-9A-Fa-f]{6,}", src)
