"""Standard Cap'n Proto stream framing, checked before any byte reaches the Cap'n Proto decoder. Pure, no I/O.

Frame = u32 LE (segment_count - 1), segment_count x u32 LE segment sizes in words, zero padding to 8 bytes,
then the segments. Frames are self-delimiting: no extra length prefix. The decoder refuses a frame as soon
as its header shows it breaks a limit (segment count, frame size), without waiting for the body.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import RemoteProtocolError


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame_bytes: int = 8 << 20          # one message, header included
    max_preplan_frame_bytes: int = 256 << 10  # until the plan is agreed (Hello, Capabilities, PlanProposal: ~10 KiB
                                            # each, measured): what a peer may make a daemon buffer before a plan
    max_segments: int = 64
    traversal_limit_in_words: int = 4 << 20  # words the decoder may visit in one message (amplification bound)
    nesting_limit: int = 16
    max_registers_per_chunk: int = 4096

    def __post_init__(self) -> None:
        if self.max_frame_bytes < 16 or self.max_segments < 1 or self.nesting_limit < 1:
            raise ValueError(f"unusable frame limits: {self}")


def header_size(nseg: int) -> int:
    return (4 + 4 * nseg + 7) & ~7


class FrameDecoder:
    """Bytes in, whole frames out. next_frame() -> bytes (a read-only memoryview after reserve()) | None (need
    more); raises RemoteProtocolError.

    Received pieces are kept as they came (a TLS record each, typically 16 KiB) and joined once per complete
    frame: no buffer growth, compaction or re-slicing per piece. The segment table is read once, as soon as its
    bytes are in; until the frame is complete a piece costs an append and a comparison."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self.max_frame = limits.max_frame_bytes     # Session lowers it until the plan is agreed
        self._parts: list[bytes] = []   # pieces not yet (wholly) returned; _parts[0] from offset _off
        self._off = 0
        self._have = 0                  # pending bytes: sum(len(p) for p in _parts) - _off
        self._need = 4                  # pending bytes before next_frame() has anything new to look at
        self._frame = 0                 # the current frame's size once its segment table was read, else 0
        self._table = 0                 # its segment-table size (header without the padding)
        self._arena: bytearray | None = None       # see reserve()
        self._arena_mv: memoryview | None = None
        self._arena_pos = 0
        self._fill = -1                 # >= 0: the current frame goes straight into the arena; bytes there so far

    def feed(self, data) -> bool:
        """Add received bytes; True when next_frame() may have a frame to return (else more bytes are needed)."""
        if not data:
            return self._have >= self._need
        if self._fill >= 0:             # the current frame's bytes go where the frame will be read from
            n = min(len(data), self._frame - self._fill)
            at = self._arena_pos + self._fill
            self._arena_mv[at:at + n] = data if n == len(data) else memoryview(data)[:n]
            self._fill += n
            self._have += len(data)
            if n < len(data):
                self._parts.append(bytes(memoryview(data)[n:]))
            return self._have >= self._need
        if type(data) is not bytes:     # a caller's bytearray / memoryview may change after feed(): keep a copy
            data = bytes(data)
        self._parts.append(data)
        self._have += len(data)
        return self._have >= self._need

    @property
    def pending(self) -> int:
        """Bytes buffered that are not yet part of a returned frame."""
        return self._have

    def _peek(self, n: int) -> bytes | memoryview:
        """The first n pending bytes (n <= pending); joined only when they span pieces."""
        first, off = self._parts[0], self._off
        if len(first) - off >= n:
            return memoryview(first)[off:off + n]
        out, k = [], 0
        for p in self._parts:
            mv = memoryview(p)[off:off + n - k]
            out.append(mv)
            k += len(mv)
            off = 0
            if k >= n:
                break
        return b"".join(out)

    def reserve(self, nbytes: int) -> None:
        """Copy the next frames (about nbytes of them) into memory allocated and touched now: the caller knows
        a stream is coming and calls this before it starts, so no page of it is first touched (faulted in)
        while the frames arrive. Those frames are then read-only memoryviews of that memory (which lives as
        long as any of them); frames beyond nbytes are joined as usual. reserve(0) drops the reservation.
        A frame whose header has arrived is copied there piece by piece as its bytes arrive (each piece while
        it is fresh in the cache, and no pieces held until the frame is whole)."""
        if self._fill >= 0:             # a frame under way in the old arena: its bytes go back to the pieces
            self._parts.insert(0, bytes(self._arena_mv[self._arena_pos:self._arena_pos + self._fill]))
            self._off, self._fill = 0, -1
        self._arena = self._arena_mv = None
        self._arena_pos = 0
        if nbytes > 0:
            arena = bytearray(nbytes)
            arena[::4096] = b"\1" * len(range(0, nbytes, 4096))     # every page touched here
            self._arena, self._arena_mv = arena, memoryview(arena)

    def _take(self, n: int):
        """Remove and return the first n pending bytes (n <= pending): one copy at most."""
        parts, off = self._parts, self._off
        first = parts[0]
        arena = self._arena_mv
        if arena is not None and self._arena_pos + n > len(arena):
            arena = self._arena = self._arena_mv = None        # used up: later frames are joined
        if arena is None and len(first) - off >= n:
            if off == 0 and len(first) == n:
                parts.pop(0)
                out = first
            else:
                out = first[off:off + n]
                if len(first) - off == n:
                    parts.pop(0)
                    off = 0
                else:
                    off += n
        else:
            pieces, k, i = [], 0, 0
            while k < n:
                p = parts[i]
                m = min(len(p) - off, n - k)
                pieces.append(memoryview(p)[off:off + m] if off or m < len(p) else p)
                k += m
                off = off + m if m < len(p) - off else 0
                if off == 0:
                    i += 1
            del parts[:i]
            if arena is None:
                out = b"".join(pieces)
            else:
                pos = start = self._arena_pos
                for piece in pieces:
                    arena[pos:pos + len(piece)] = piece
                    pos += len(piece)
                self._arena_pos = pos
                out = arena[start:pos].toreadonly()
        self._off = off
        self._have -= n
        return out

    def _fill_from_parts(self) -> None:
        """Start filling the current frame in the arena: the pending bytes (all of this frame: fewer than its
        size) move there; later pieces go straight there (feed)."""
        pos, arena = self._arena_pos, self._arena_mv
        for i, p in enumerate(self._parts):
            mv = memoryview(p)[self._off:] if i == 0 else p
            arena[pos:pos + len(mv)] = mv
            pos += len(mv)
        self._parts.clear()
        self._off = 0
        self._fill = pos - self._arena_pos

    def next_frame(self) -> bytes | memoryview | None:
        if self._have < self._need:
            return None
        lim = self.limits
        if not self._frame:
            nseg = struct.unpack_from("<I", self._peek(4))[0] + 1
            if nseg > lim.max_segments:
                raise RemoteProtocolError(f"frame declares {nseg} segments; the limit is {lim.max_segments}",
                                          "too-many-segments")
            table = 4 + 4 * nseg
            if self._have < table:
                self._need = table
                return None
            sizes = struct.unpack_from(f"<{nseg}I", self._peek(table), 4)
            total = header_size(nseg) + 8 * sum(sizes)
            if total > self.max_frame:
                raise RemoteProtocolError(f"frame declares {total} bytes ({nseg} segments of {list(sizes)[:8]} "
                                          f"words); the limit is {self.max_frame}"
                                          + ("" if self.max_frame == lim.max_frame_bytes else
                                             " until the plan is agreed"), "frame-too-large")
            if sizes[0] == 0:
                raise RemoteProtocolError("frame's first segment is empty: no root pointer", "malformed-frame")
            self._frame, self._table, self._need = total, table, total
            if self._have < total:
                arena = self._arena_mv
                if arena is not None and self._arena_pos + total <= len(arena):
                    self._fill_from_parts()
                return None
        total, table = self._frame, self._table
        if self._fill >= 0:
            start = self._arena_pos
            frame = self._arena_mv[start:start + total].toreadonly()
            self._arena_pos += total
            self._have -= total
            self._fill = -1
        else:
            frame = self._take(total)
        self._frame, self._need = 0, 4
        if table & 7 and any(frame[table:table + 4]):
            raise RemoteProtocolError("segment-table padding is not zero", "malformed-frame")
        return frame
