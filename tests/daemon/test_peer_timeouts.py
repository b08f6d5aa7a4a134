"""Peer-link timeouts on trio's MockClock (autojump): a peer that never answers, over an in-memory stream pair - the
whole wait passes at once, and nothing but the timeout can end it (no TLS, no threads, no sockets)."""
from __future__ import annotations

import pytest
import trio
import trio.testing

from invariantd.daemon.peer import PeerConfig, PeerError, fetch_capabilities, inquire


async def silent_peer(stream) -> None:
    """Reads whatever comes and never answers."""
    while await stream.receive_some(65536):
        pass


@pytest.mark.parametrize("ask", ["inquire", "capabilities"])
async def test_a_silent_peer_times_out_after_the_handshake_timeout(autojump_clock, ask):
    ours, theirs = trio.testing.memory_stream_pair()
    cfg = PeerConfig(handshake_timeout=42)
    async with trio.open_nursery() as n:
        n.start_soon(silent_peer, theirs)
        t0 = trio.current_time()
        with pytest.raises(PeerError) as ei:
            if ask == "inquire":
                await inquire(ours, "m-1", "vm-1", cfg=cfg)
            else:
                await fetch_capabilities(ours, cfg=cfg)
        waited = trio.current_time() - t0
        n.cancel_scope.cancel()
    assert ei.value.kind == "timeout" and "did not answer in time" in str(ei.value)
    assert 42 <= waited < 43                    # the configured timeout, not sooner and not much later
