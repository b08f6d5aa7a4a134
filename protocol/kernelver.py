"""Kernel versions, the one parser: a release or version string -> (major, minor).

"6.12" -> (6, 12); "6.12.118+deb13-arm64" -> (6, 12); "7.3-patched" -> (7, 3); "3.11" -> (3, 11). The kernel facts
are keyed by major.minor (protocol/data/*.tsv `since` / `until` columns, the simulator's eras), so nothing finer
is kept. A part's leading digits count ("1-patched" -> 1); parsing stops at the first part without any.
"""
from __future__ import annotations

KernelVersion = tuple[int, ...]


def parse(text: str) -> KernelVersion:
    """(major, minor) from the start of `text`; () when it starts with no number."""
    out: list[int] = []
    for part in str(text).split(".")[:2]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def data(text: str) -> KernelVersion:
    """A data table's version column: blank = every kernel supported, (0,); anything else must parse."""
    if not text:
        return (0,)
    v = parse(text)
    if not v:
        raise ValueError(f"{text!r} is not a kernel version like 6.3")
    return v


def major_minor(release: str) -> str:
    """'6.12.118+deb13-arm64' -> '6.12' (a capability document's kernel_version)."""
    v = parse(release)
    return ".".join(map(str, v)) if len(v) == 2 else release
