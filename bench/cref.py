"""bench/cref.c built with the system compiler into a temporary folder and loaded with ctypes (the benches' C
references: they run on the same /dev/kvm fds as the Python path, in the same process, interleaved with it)."""
from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
from pathlib import Path

from invariantd.protocol.regset import RegisterSet

_HERE = Path(__file__).resolve().parent
_U64P, _U8P, _INTP = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint8), ctypes.POINTER(ctypes.c_int)


def load() -> ctypes.CDLL:
    d = tempfile.mkdtemp(prefix="invariantd-cref-")
    so = os.path.join(d, "cref.so")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", so, str(_HERE / "cref.c")], check=True)
    lib = ctypes.CDLL(so)
    lib.cref_set_loop.restype = lib.cref_apply.restype = ctypes.c_int64
    lib.cref_set_loop.argtypes = [ctypes.c_int, _U64P, _U8P, _U64P, ctypes.c_int, ctypes.c_int, _INTP]
    lib.cref_apply.argtypes = [ctypes.c_int, ctypes.c_int, _U64P, _U8P, ctypes.c_uint64, _U64P, ctypes.c_int, _INTP]
    lib.cref_blackout_part.restype = ctypes.c_int64
    lib.cref_blackout_part.argtypes = [_INTP, ctypes.c_int, ctypes.c_int, _U64P, _U8P, ctypes.c_uint64, _U64P,
                                       ctypes.c_int, ctypes.c_int, _INTP]
    return lib


class Arrays:
    """RegisterSets of one register list (one per vCPU) as the C arrays cref.c takes: ids, each register's offset,
    and every set's bytes end to end (set v at v * stride)."""

    def __init__(self, sets: list[RegisterSet]) -> None:
        lay = sets[0].layout
        if any(s.layout.ids != lay.ids for s in sets):
            raise ValueError("cref.Arrays: every vCPU must have the same register list")
        self.n = len(lay.ids)
        self.stride = len(sets[0].data)
        self.ids = (ctypes.c_uint64 * self.n)(*lay.ids)
        blob = b"".join(bytes(s.data) for s in sets) or b"\0"
        self.data = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        self.offs = (ctypes.c_uint64 * self.n)(*lay.offsets)
