"""`invariantctl demo`: two in-process daemons (simulated r0p3@6.12 -> r0p4@7.3), create, plan, migrate via RPC."""
from __future__ import annotations

import json

from invariantd.client.cli import main


def test_demo_text(capsys):
    assert main(["demo", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "MIDR_EL1" in out and "pin" in out and "result: MIGRATABLE" in out        # the plan table
    assert "outcome: COMMITTED" in out and "2/2 vCPUs" in out                          # the outcome
    assert "node-a holds demo-vm: released" in out and "node-b holds demo-vm: running" in out
    assert 'invariantd_migrations_total{result="committed"}  +1' in out               # metrics that moved
    assert 'invariantd_set_one_reg_failures_total{errno="ENOENT"' in out


def test_demo_json(capsys):
    assert main(["demo", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["exit_code"] == 0 and rep["migration"]["state"] == "committed"
    assert rep["plan"]["migratable"] and rep["plan"]["plan"]["enable_cap239"]
    src = {(r["metric"], tuple(sorted(r["labels"].items()))): r["delta"] for r in rep["metrics_deltas"]["source"]}
    dst = {(r["metric"], tuple(sorted(r["labels"].items()))): r["delta"] for r in rep["metrics_deltas"]["destination"]}
    assert src[("invariantd_migrations_total", (("result", "committed"),))] == 1
    assert dst[("invariantd_migrations_total", (("result", "committed"),))] == 1
    assert src[("invariantd_stream_bytes_total", (("direction", "sent"),))] == \
        dst[("invariantd_stream_bytes_total", (("direction", "received"),))]
