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
    """Bytes in, whole frames out. next_frame() -> bytes | None (need more); raises RemoteProtocolError."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self._buf = bytearray()
        self._pos = 0
        self._need = 4            # bytes (from _pos) before the next frame can be complete: no re-parse until then

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes buffered that are not yet part of a returned frame."""
        return len(self._buf) - self._pos

    def next_frame(self) -> bytes | None:
        buf, pos, lim = self._buf, self._pos, self.limits
        avail = len(buf) - pos
        if avail < self._need:
            return None
        nseg = struct.unpack_from("<I", buf, pos)[0] + 1
        if nseg > lim.max_segments:
            raise RemoteProtocolError(f"frame declares {nseg} segments; the limit is {lim.max_segments}",
                                      "too-many-segments")
        hdr = header_size(nseg)
        if avail < 4 + 4 * nseg:
            self._need = 4 + 4 * nseg
            return None
        sizes = struct.unpack_from(f"<{nseg}I", buf, pos + 4)
        total = hdr + 8 * sum(sizes)
        if total > lim.max_frame_bytes:
            raise RemoteProtocolError(f"frame declares {total} bytes ({nseg} segments of {list(sizes)[:8]} words); "
                                      f"the limit is {lim.max_frame_bytes}", "frame-too-large")
        if sizes[0] == 0:
            raise RemoteProtocolError("frame's first segment is empty: no root pointer", "malformed-frame")
        if avail < total:
            self._need = total
            return None
        if hdr > 4 + 4 * nseg and any(buf[pos + 4 + 4 * nseg:pos + hdr]):
            raise RemoteProtocolError("segment-table padding is not zero", "malformed-frame")
        with memoryview(buf) as mv:
            frame = bytes(mv[pos:pos + total])          # one copy (a bytearray slice would copy twice)
        self._pos = pos + total
        self._need = 4
        return frame
