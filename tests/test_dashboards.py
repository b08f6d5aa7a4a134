"""deploy/prometheus and deploy/grafana: the alert rules pass promtool (syntax and their own unit tests), and every
metric the rules and the dashboard query is one the daemon exports (or Prometheus's own `up`)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from invariantd.daemon.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
EXPORTED_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_info", "_created")


def exported() -> set[str]:
    m = Metrics()
    m.migration("committed")
    m.stream("sent", 1)
    with m.phase("apply"):
        pass
    m.set_one_reg_failures.labels("X", "EINVAL").inc()
    m.invariant_overrides.labels("X", "override-plan").inc()
    m.host.info({"kernel": "6.12"})
    names = set()
    for line in generate_latest(m.registry).decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names | {"up"}


def metric_names(expr: str) -> set[str]:
    words = set(re.findall(r"\b([a-z_]+(?:_[a-z0-9]+)+)\b(?=\s*[{\[)]|\s*$|\s*[=!<>])", expr))
    funcs = {"histogram_quantile", "label_values"}
    return {w for w in words if w.startswith(("invariantd_", "process_", "python_", "up")) and w not in funcs}


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Debian's prometheus) not installed")
def test_rules_pass_promtool_check_and_their_unit_tests():
    d = DEPLOY / "prometheus"
    for cmd in (["promtool", "check", "rules", "invariantd-rules.yml"], ["promtool", "test", "rules",
                                                                           "invariantd-rules.test.yml"]):
        r = subprocess.run(cmd, cwd=d, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_rules_and_dashboard_query_only_exported_metrics():
    have = exported()
    rules = (DEPLOY / "prometheus" / "invariantd-rules.yml").read_text()
    exprs = re.findall(r"expr: (.*)", rules)
    dash = json.loads((DEPLOY / "grafana" / "invariantd-dashboard.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 14
    used = set().union(*(metric_names(e) for e in exprs))
    assert used and used <= have, used - have
    assert {"invariantd_migrations_total", "process_resident_memory_bytes", "invariantd_build_info"} <= used
