"""A vCPU's register state: one type from the source's read to the destination's KVM_SET_ONE_REG.

    rs = RegisterSet.from_pairs([(reg_id, value), ...])       # or from_bytes(ids, data) / from_values(ids, values)
    rs.data                     # the values as KVM holds them: KVM_REG_SIZE(id) bytes each, little-endian, end to end
    rs.ids, rs.ids_le           # the register ids (tuple; packed u64 little-endian: the wire form)
    for reg_id, value in rs:    # (id, int) pairs, decoded once, on first use
    rs.replace({reg_id: v})     # a new set with some values changed (the plan's values)

The bytes are the wire's (VcpuChunk.values), the KVM binding's buffer and the apply engine's input alike, so a
value is not converted between forms on its way: what the source read is what the destination writes, unless the
plan says otherwise. An id list is validated once (its layout is cached, bounded: a hostile peer's distinct lists
cannot grow it); a set is validated once, when made.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator, Mapping, Sequence

from . import regid
from .errors import LocalProtocolError

_SIZE_FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _need(cond: bool, msg: str, what: str = "bad-chunk") -> None:
    if not cond:
        raise LocalProtocolError(msg, what)


@dataclass(frozen=True, slots=True)
class Layout:
    """What a register-id list implies, computed once per distinct list (every vCPU of a VM repeats it)."""
    ids: tuple[int, ...]
    ids_le: bytes                 # the ids as packed u64 LE (the wire form and the checksum input)
    total: int                    # value bytes the ids need
    fmt: str                      # struct format of the values ('Q' ... or 'Ns' for registers wider than 8)
    wide: tuple[int, ...]         # positions of the registers wider than 8 bytes
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]      # each register's first byte in the data


@lru_cache(maxsize=64)
def layout_le(ids_le: bytes) -> Layout:
    """The layout of a packed u64 LE id list; LocalProtocolError ("bad-chunk" / "bad-register") if it is none."""
    _need(len(ids_le) % 8 == 0, f"register id list of {len(ids_le)} bytes is not a list of u64")
    ids = struct.unpack(f"<{len(ids_le) // 8}Q", ids_le)
    sizes, fmt, wide, offsets, off = [], ["<"], [], [], 0
    for i, r in enumerate(ids):
        size_code = (r & regid.KVM_REG_SIZE_MASK) >> regid.KVM_REG_SIZE_SHIFT
        _need(size_code <= regid.SIZE_U2048, f"register {r:#018x}: size code {size_code} above U2048",
              "bad-register")
        n = regid.size_bytes(r)
        sizes.append(n)
        offsets.append(off)
        off += n
        if n in _SIZE_FMT:
            fmt.append(_SIZE_FMT[n])
        else:
            fmt.append(f"{n}s")
            wide.append(i)
    return Layout(ids, ids_le, off, "".join(fmt), tuple(wide), tuple(sizes), tuple(offsets))


@lru_cache(maxsize=64)
def layout(ids: tuple[int, ...]) -> Layout:
    """The layout of an id tuple (each must be a u64)."""
    for r in ids:
        _need(isinstance(r, int) and 0 <= r < 1 << 64, f"register id {r!r} is not a u64", "bad-register")
    return layout_le(struct.pack(f"<{len(ids)}Q", *ids))


def pack(lay: Layout, values: Sequence[int]) -> bytes:
    """Values (ints) -> the set's bytes; LocalProtocolError if one does not fit its register."""
    vals = list(values)
    _need(len(vals) == len(lay.ids), f"{len(vals)} values for {len(lay.ids)} registers")
    try:
        for i in lay.wide:
            vals[i] = int(vals[i]).to_bytes(lay.sizes[i], "little")
        return struct.pack(lay.fmt, *vals)
    except (OverflowError, struct.error) as e:
        raise LocalProtocolError(f"register value does not fit its size: {e}", "bad-chunk") from None


def unpack(lay: Layout, data) -> list[int]:
    """The set's bytes -> values (ints)."""
    if not lay.total:
        return []
    vals = list(struct.unpack(lay.fmt, data))
    for k in lay.wide:
        vals[k] = int.from_bytes(vals[k], "little")
    return vals


_PICKS: dict = {}


def _pick_plan(lay: Layout, positions: tuple[int, ...]) -> tuple[Layout, tuple[tuple[int, int], ...]]:
    """RegisterSet.pick's layout and byte runs for these positions of `lay` (cached per layout and positions)."""
    key = (lay.ids_le, positions)
    got = _PICKS.get(key)
    if got is None:
        runs: list[list[int]] = []
        for k in positions:
            a, b = lay.offsets[k], lay.offsets[k] + lay.sizes[k]
            if runs and runs[-1][1] == a:
                runs[-1][1] = b
            else:
                runs.append([a, b])
        if len(_PICKS) >= 256:
            _PICKS.clear()
        got = _PICKS[key] = (layout(tuple(lay.ids[k] for k in positions)), tuple(map(tuple, runs)))
    return got


class RegisterSet(Sequence):
    """The registers of one vCPU: ids and their values as KVM holds them. A Sequence of (id, value) pairs, so
    code that reads pairs reads it unchanged; equal to another set (or a list of pairs) holding the same."""
    __slots__ = ("layout", "data", "_values")

    def __init__(self, lay: Layout, data: bytes | memoryview) -> None:
        _need(len(data) == lay.total, f"{len(data)} value bytes for registers needing {lay.total}")
        self.layout, self.data, self._values = lay, data, None

    # --- making one
    @classmethod
    def from_bytes(cls, ids: Sequence[int] | bytes, data: bytes | memoryview) -> "RegisterSet":
        """ids: a tuple/list of ids or their packed u64 LE form."""
        lay = layout_le(ids) if isinstance(ids, (bytes, memoryview)) else layout(tuple(ids))
        return cls(lay, data)

    @classmethod
    def from_values(cls, ids: Sequence[int], values: Sequence[int]) -> "RegisterSet":
        lay = layout(tuple(ids))
        rs = cls(lay, pack(lay, values))
        rs._values = list(map(int, values))
        return rs

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, int]]) -> "RegisterSet":
        if isinstance(pairs, RegisterSet):
            return pairs
        pairs = list(pairs)
        return cls.from_values([r for r, _ in pairs], [v for _, v in pairs])

    @classmethod
    def concat(cls, sets: Sequence["RegisterSet"]) -> "RegisterSet":
        """One set from several (a vCPU whose registers came in several chunks), in order."""
        if len(sets) == 1:
            return sets[0]
        return cls.from_bytes(b"".join(bytes(s.ids_le) for s in sets), b"".join(bytes(s.data) for s in sets))

    # --- reading it
    @property
    def ids(self) -> tuple[int, ...]:
        return self.layout.ids

    @property
    def ids_le(self) -> bytes:
        return self.layout.ids_le

    def values(self) -> list[int]:
        if self._values is None:
            self._values = unpack(self.layout, self.data)
        return self._values

    def __len__(self) -> int:
        return len(self.layout.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [(r, v) for r, v in zip(self.layout.ids[i], self.values()[i])]
        return self.layout.ids[i], self.values()[i]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.layout.ids, self.values())

    def slice(self, start: int, stop: int) -> "RegisterSet":
        """Registers start..stop-1 as a set (a chunk's share), without decoding values."""
        lay = self.layout
        ids = lay.ids[start:stop]
        lo = lay.offsets[start] if start < len(lay.ids) else lay.total
        hi = lay.offsets[stop] if stop < len(lay.ids) else lay.total
        return RegisterSet(layout(ids), self.data[lo:hi])

    def pick(self, positions: Sequence[int]) -> "RegisterSet":
        """The registers at `positions` (in that order) as a set, their bytes copied as they are (neighbouring
        registers as one slice: a vCPU's state registers minus its VM-wide ones are a few runs)."""
        lay, runs = _pick_plan(self.layout, tuple(positions))
        data = self.data
        return RegisterSet(lay, b"".join([data[a:b] for a, b in runs]) if len(runs) != 1 else
                           bytes(data[runs[0][0]:runs[0][1]]))

    def as_dict(self) -> dict[int, int]:
        return dict(zip(self.layout.ids, self.values()))

    def replace(self, updates: Mapping[int, int]) -> "RegisterSet":
        """The same registers with some values changed (ids not in the set are ignored)."""
        if not updates:
            return self
        vals = list(self.values())
        for k, r in enumerate(self.layout.ids):
            if r in updates:
                vals[k] = updates[r]
        return RegisterSet.from_values(self.layout.ids, vals)

    def __eq__(self, other) -> bool:
        if isinstance(other, RegisterSet):
            return self.layout.ids_le == other.layout.ids_le and bytes(self.data) == bytes(other.data)
        if isinstance(other, (list, tuple)):
            return list(self) == [tuple(p) for p in other]
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"RegisterSet({len(self)} registers, {self.layout.total} bytes)"
