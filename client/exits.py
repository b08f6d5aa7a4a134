"""invariantctl's exit codes: the one table (every command, `--help`, and the RPC error kinds map here).

Stable, for orchestrators. An RPC failure's code follows its ErrorKind (rpc.capnp): BY_KIND.
"""
from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    REFUSED = 3
    UNREACHABLE = 4
    KVM = 5
    LAB = 6
    FAILED = 7
    FORBIDDEN = 8
    RUNNING = 9


MEANING = {
    Exit.OK: "success",
    Exit.INTERNAL: "internal error (a bug: report)",
    Exit.USAGE: "usage, bad input, not found, conflict",
    Exit.REFUSED: "plan refused (not migratable)",
    Exit.UNREACHABLE: "peer or daemon unreachable",
    Exit.KVM: "KVM / apply error (register, id and errno in the message)",
    Exit.LAB: "lab unavailable (no Debian archive or qemu)",
    Exit.FAILED: "migration failed, aborted, cancelled or in doubt",
    Exit.FORBIDDEN: "forbidden (the caller's role may not call this)",
    Exit.RUNNING: "still running: invariantctl stopped waiting, the migration goes on (invariantctl status ID)",
}

# ErrorKind (rpc.capnp) -> exit code; a kind not listed (a newer daemon's) is INTERNAL
BY_KIND = {"ok": Exit.OK, "badRequest": Exit.USAGE, "notFound": Exit.USAGE, "conflict": Exit.USAGE,
           "refused": Exit.REFUSED, "unreachable": Exit.UNREACHABLE, "kvm": Exit.KVM,
           "migrationFailed": Exit.FAILED, "internal": Exit.INTERNAL, "forbidden": Exit.FORBIDDEN}


def for_kind(kind: str) -> Exit:
    return BY_KIND.get(kind, Exit.INTERNAL)


def table() -> str:
    """The exit-code table for --help epilogs."""
    return "Exit codes (stable, for orchestrators):\n" + "\n".join(f"  {int(c)}  {MEANING[c]}" for c in Exit)


class CliError(Exception):
    """A command-line failure with the exit code it ends with (default: usage / bad input)."""

    def __init__(self, message: str, code: int = Exit.USAGE) -> None:
        super().__init__(message)
        self.code = int(code)
