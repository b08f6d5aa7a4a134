"""daemon/metrics.py: families, recording from apply events, the trio /metrics server scraped over loopback."""
from __future__ import annotations

import os
import shutil
from functools import partial

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from invariantd.daemon.apply import ApplyEvent
from invariantd.daemon.metrics import Metrics, serve_metrics
from support.cluster import by_name, scrape

FAMILIES = {"invariantd_set_one_reg_failures", "invariantd_invariant_overrides", "invariantd_plan_verdicts",
            "invariantd_migrations", "invariantd_migration_phase_seconds", "invariantd_stream_bytes",
            "invariantd_host_info"}


def filled() -> Metrics:
    m = Metrics()
    m.record_apply_events([
        ApplyEvent(0, "MIDR_EL1", 0x603000000013C000, "EINVARIANT", "override-destination", ("Revision",)),
        ApplyEvent(1, "MIDR_EL1", 0x603000000013C000, "EINVARIANT", "override-destination", ("Revision",)),
        ApplyEvent(0, "TCR2_EL1", 0x603000000013C103, "ENOENT", "drop-reset"),
        ApplyEvent(0, "SCTLR_EL1", 0x603000000013C080, "EINTR", "retry-transient"),
        ApplyEvent(0, "SCTLR_EL1", 0x603000000013C080, "EINTR", "abort"),
    ])
    m.record_verdicts(["identical", "identical", "override"])
    m.migration("committed")
    m.stream("sent", 1234)
    with m.phase("apply"):
        pass
    m.set_host_info({"kernel_release": "6.12.0", "arch": "aarch64", "source": "sim",
                     "cpu_midrs": ["0x410fd083", "0x410fd083"]})
    return m






async def test_scrape_and_parse(nursery):
    m = filled()
    port = await nursery.start(partial(serve_metrics, m, "127.0.0.1", 0))
    status, headers, body = await scrape(port)
    assert status == "HTTP/1.1 200 OK" and headers["content-type"].startswith("text/plain; version=")
    fams = by_name(body.decode())
    assert FAMILIES <= set(fams)
    fail = {(s.labels["register"], s.labels["errno"]): s.value
            for s in fams["invariantd_set_one_reg_failures"].samples if s.name.endswith("_total")}
    assert fail == {("MIDR_EL1", "EINVARIANT"): 2, ("TCR2_EL1", "ENOENT"): 1, ("SCTLR_EL1", "EINTR"): 1}
    ov = {(s.labels["register"], s.labels["action"]): s.value
          for s in fams["invariantd_invariant_overrides"].samples if s.name.endswith("_total")}
    assert ov == {("MIDR_EL1", "override-destination"): 2, ("TCR2_EL1", "drop-reset"): 1}
    [info] = fams["invariantd_host_info"].samples
    assert info.name == "invariantd_host_info" and info.labels["midr"] == "0x410fd083"
    assert any(s.name == "invariantd_migration_phase_seconds_count" and s.labels["phase"] == "apply"
               and s.value == 1 for s in fams["invariantd_migration_phase_seconds"].samples)


async def test_openmetrics_when_asked_and_errors(nursery):
    port = await nursery.start(partial(serve_metrics, filled(), "127.0.0.1", 0))
    _, headers, body = await scrape(port, accept="application/openmetrics-text; version=1.0.0")
    assert headers["content-type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    status, _, _ = await scrape(port, "/nope")
    assert status.startswith("HTTP/1.1 404")
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(b"POST /metrics HTTP/1.1\r\n\r\n")
    with trio.fail_after(5):
        assert (await s.receive_some(100)).startswith(b"HTTP/1.1 405")
    await s.aclose()


async def test_promtool_check_metrics(nursery):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("promtool missing under CI: the README's test command installs Debian's `prometheus`")
        pytest.skip("promtool not installed (Debian package `prometheus`): metrics lint not run")
    port = await nursery.start(partial(serve_metrics, filled(), "127.0.0.1", 0))
    _, _, body = await scrape(port)
    with trio.fail_after(20):
        r = await trio.run_process([promtool, "check", "metrics"], stdin=body, capture_stdout=True,
                                   capture_stderr=True, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_every_result_and_verdict_label_exists_from_the_start():
    from invariantd.daemon.metrics import RESULTS, Metrics
    from invariantd.protocol.schemas import Verdict
    from prometheus_client import generate_latest
    m = Metrics()
    text = generate_latest(m.registry).decode()
    for r in RESULTS:
        assert f'invariantd_migrations_total{{result="{r}"}} 0.0' in text
    for v in Verdict:
        assert f'invariantd_plan_verdicts_total{{verdict="{v.value}"}} 0.0' in text
