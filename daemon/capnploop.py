"""The thread Cap'n Proto RPC runs in: pycapnp 2.x RPC is asyncio-only, so both ends of the orchestrator RPC - the
daemon's server (rpcserve.py) and the client (rpcclient.py, used by invariantctl and by the daemon to call its
peers) - run an asyncio loop with pycapnp's KJ loop in a thread of their own and hand plain data across."""
from __future__ import annotations

import asyncio
import logging
import threading

log = logging.getLogger("invariantd.rpc")


class CapnpLoop:
    """start() runs the loop in a daemon thread; `started` is set once it runs (or `error` says why it could
    not); stop() ends it. Subclasses may override on_start() / on_stop(), both called in the loop's thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = threading.Event()
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def on_start(self) -> None:
        pass

    def on_stop(self) -> None:
        pass

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        import capnp

        async def main():
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.on_start()
            self.started.set()
            try:
                await self._stop.wait()
            finally:
                self.on_stop()
        try:
            asyncio.run(capnp.run(main()))
        except BaseException as e:      # noqa: BLE001 - reported to whoever waits for the start
            if not self.started.is_set():
                self.error = e
                self.started.set()
            else:
                log.error("%s: the Cap'n Proto loop ended: %r", self.name, e)

    def call_soon(self, fn) -> None:
        """fn() in the loop's thread (from any thread)."""
        self.loop.call_soon_threadsafe(fn)

    def submit(self, coro):
        """A concurrent.futures.Future for `coro` run in the loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, join: float | None = None) -> None:
        if self.loop is not None and self._stop is not None:
            try:
                self.loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:            # the loop already ended
                pass
        if join is not None and self.thread.is_alive():
            self.thread.join(join)
