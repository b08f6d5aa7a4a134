"""Prometheus metrics (own CollectorRegistry) and a small trio /metrics HTTP server (no extra dependency).

Families (DESIGN.md "Metrics"):
  invariantd_set_one_reg_failures_total{register,errno}   every refused KVM_SET_ONE_REG the apply engine saw
  invariantd_invariant_overrides_total{register,action}   override-destination | override-plan | drop-reset
  invariantd_plan_verdicts_total{verdict}                 identical | set | override | pin | drop | refuse ...
  invariantd_migrations_total{result}                     committed | aborted | failed | in-doubt ...
  invariantd_migration_phase_seconds{phase}               histogram: handshake, plan, preflight, read (after the pause), stream, apply, commit
  invariantd_stream_bytes_total{direction}                sent | received (peer protocol bytes)
  invariantd_host_info{kernel,arch,midr,source,...}       constant 1 with the host's identity as labels
  invariantd_build_info{version,python,pycapnp}           constant 1: what runs
  process_* (RSS, CPU seconds, open fds, start time), python_info, python_gc_*: prometheus_client's own collectors
Alert rules and a Grafana dashboard over these: deploy/prometheus/, deploy/grafana/.
"""
from __future__ import annotations

import contextlib
import time
from functools import partial
from typing import Iterable, Iterator, Mapping

import trio
from prometheus_client import (CollectorRegistry, Counter, GCCollector, Histogram, Info,
                               PlatformCollector, ProcessCollector)
from prometheus_client.exposition import choose_encoder

from .apply import OVERRIDES, EventAction

RESULTS = ("committed", "aborted", "cancelled", "in-doubt")      # every migrations_total label, 0 from the start
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def build_labels() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version as dist_version

    from ..protocol import version
    try:
        pycapnp = dist_version("pycapnp")
    except PackageNotFoundError:
        pycapnp = "unknown"
    return {"version": version(), "python": platform.python_version(), "pycapnp": pycapnp}


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.set_one_reg_failures = Counter(
            "invariantd_set_one_reg_failures", "KVM_SET_ONE_REG calls refused during apply, by register and errno",
            ["register", "errno"], registry=r)
        self.invariant_overrides = Counter(
            "invariantd_invariant_overrides", "Registers applied with a value other than the source's, or dropped",
            ["register", "action"], registry=r)
        self.plan_verdicts = Counter(
            "invariantd_plan_verdicts", "Per-field plan verdicts", ["verdict"], registry=r)
        self.migrations = Counter(
            "invariantd_migrations", "Migrations by result (either role)", ["result"], registry=r)
        for res in RESULTS:                # a rate() over a result that never happened yet is 0, not absent
            self.migrations.labels(res)
        from ..protocol.schemas import Verdict
        for v in Verdict:
            self.plan_verdicts.labels(v.value)
        self.phase_seconds = Histogram(
            "invariantd_migration_phase_seconds", "Time spent per migration phase", ["phase"],
            buckets=PHASE_BUCKETS, registry=r)
        self.stream_bytes = Counter(
            "invariantd_stream_bytes", "Peer protocol bytes", ["direction"], registry=r)
        self.host = Info("invariantd_host", "This host's kernel and CPU identity", registry=r)
        self.build = Info("invariantd_build", "The running invariantd", registry=r)
        self.build.info(build_labels())
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    # --- recording helpers
    def record_apply_events(self, events: Iterable) -> None:
        """ApplyEvents (daemon/apply.py): failures by errno, overrides/drops by action."""
        for ev in events:
            if ev.action == EventAction.ABORT:
                continue           # the failure that led to the abort was already counted with its first refusal
            if ev.errno != "-":    # "-": a planned override written directly, no failed write
                self.set_one_reg_failures.labels(ev.register, ev.errno).inc()
            if ev.action in OVERRIDES:
                self.invariant_overrides.labels(ev.register, ev.action).inc()

    def record_verdicts(self, verdicts: Iterable[str]) -> None:
        for v in verdicts:
            self.plan_verdicts.labels(v).inc()

    def migration(self, result: str) -> None:
        if result not in RESULTS:
            raise ValueError(f"migration result {result!r} is not one of {RESULTS}")
        self.migrations.labels(result).inc()

    def stream(self, direction: str, n: int) -> None:
        if n:
            self.stream_bytes.labels(direction).inc(n)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds.labels(name).observe(time.perf_counter() - t0)

    def set_host_info(self, doc: Mapping) -> None:
        """From a capability document (daemon/probe.py)."""
        midrs = doc.get("cpu_midrs") or []
        self.host.info({
            "kernel": str(doc.get("kernel_release", "")),
            "arch": str(doc.get("arch", "")),
            "source": str(doc.get("source", "")),
            "profile": str(doc.get("profile") or ""),
            "midr": ",".join(sorted(set(midrs))),
            "era": str(doc.get("sim_era", "")),
        })

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        encoder, ctype = choose_encoder(accept or "")
        return encoder(self.registry), ctype


# --- HTTP -----------------------------------------------------------------------------------------------------
MAX_HEAD = 16 << 10
REQUEST_TIMEOUT = 10.0


async def _read_head(stream: trio.abc.Stream) -> bytes | None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            return None
        data = await stream.receive_some(4096)
        if not data:
            return None
        buf += data
    return buf.split(b"\r\n\r\n", 1)[0]


def _response(status: str, body: bytes, ctype: str = "text/plain; charset=utf-8", head_only: bool = False) -> bytes:
    hdr = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
           f"Connection: close\r\n\r\n").encode()
    return hdr + (b"" if head_only else body)


async def handle_http(metrics: Metrics, stream: trio.abc.Stream) -> None:
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            head = await _read_head(stream)
            if head is None:
                await stream.send_all(_response("400 Bad Request", b"bad request\n"))
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                await stream.send_all(_response("400 Bad Request", b"bad request line\n"))
                return
            method, target, _ = parts
            headers = {}
            for ln in lines[1:]:
                k, _, v = ln.partition(":")
                headers[k.strip().lower()] = v.strip()
            if method not in ("GET", "HEAD"):
                await stream.send_all(_response("405 Method Not Allowed", b"GET only\n"))
                return
            path = target.split("?", 1)[0]
            if path == "/metrics":
                body, ctype = await trio.to_thread.run_sync(metrics.exposition, headers.get("accept"))
                await stream.send_all(_response("200 OK", body, ctype, method == "HEAD"))
            elif path in ("/", "/healthz"):
                await stream.send_all(_response("200 OK", b"invariantd: see /metrics\n", head_only=method == "HEAD"))
            else:
                await stream.send_all(_response("404 Not Found", b"not found: try /metrics\n"))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_metrics(metrics: Metrics, host: str = "127.0.0.1", port: int = 9464, *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve /metrics until cancelled. task_status.started(port) reports the bound port (port=0 for tests)."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise OSError(e.errno, f"/metrics cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_listeners, partial(handle_http, metrics), listeners,
                                    handler_nursery=nursery))
        task_status.started(bound)
