"""`invariantd-qemu`: start QEMU with the invariantd agent loaded (usable as libvirt's <emulator>).

    invariantd-qemu [QEMU ARGS...]

Runs $INVARIANTD_QEMU (default: qemu-system-aarch64 on PATH) with the agent prepended to LD_PRELOAD; every
argument goes to QEMU unchanged. The agent reads its settings from the environment (daemon/vmm/agent.c:
INVARIANTD_AGENT_SOCKET, INVARIANTD_MIGRATION, INVARIANTD_PLAN_DIGEST, ...); INVARIANTD_VM defaults to QEMU's
-name (guest=NAME or NAME). Without a daemon the agent passes every ioctl through and QEMU runs as it would.
"""
from __future__ import annotations

import os
import shutil
import sys

from . import AgentMissing, agent_library


def vm_name(argv: list[str]) -> str:
    """QEMU's -name value: `-name NAME` or `-name guest=NAME,...`."""
    for i, a in enumerate(argv[:-1]):
        if a in ("-name", "--name"):
            v = argv[i + 1]
            for part in v.split(","):
                if part.startswith("guest="):
                    return part[6:]
            return v.split(",")[0]
    return ""


def command(argv: list[str], env: dict[str, str]) -> tuple[str, list[str], dict[str, str]]:
    """(program, argv, environment) to exec."""
    qemu = env.get("INVARIANTD_QEMU") or shutil.which("qemu-system-aarch64", path=env.get("PATH")) or ""
    if not qemu:
        raise FileNotFoundError("qemu-system-aarch64 not found on PATH; set INVARIANTD_QEMU to the QEMU binary")
    out = dict(env)
    lib = str(agent_library())
    pre = [p for p in env.get("LD_PRELOAD", "").split() if p and p != lib]
    out["LD_PRELOAD"] = " ".join([lib, *pre])
    if not out.get("INVARIANTD_VM"):
        name = vm_name(argv)
        if name:
            out["INVARIANTD_VM"] = name
    return qemu, [qemu, *argv], out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--invariantd-help"]:
        print(__doc__.strip())
        return 0
    try:
        prog, full, env = command(args, dict(os.environ))
    except (FileNotFoundError, AgentMissing) as e:
        print(f"invariantd-qemu: {e}", file=sys.stderr)
        return 2
    os.execve(prog, full, env)
    return 127      # not reached


if __name__ == "__main__":
    sys.exit(main())
