"""`invariantctl fleet hosts | plan | baseline` against Debian's real etcd on loopback, the store written in the
daemons' layout (daemon/fleet.put_host): ranking, one plan per document, hosts that cannot be planned, exit codes."""
from __future__ import annotations

import json
import shutil

import pytest

from invariantd.client.cli import main
from invariantd.daemon import fleet as layout
from invariantd.daemon.probe import probe
from invariantd.daemon.sim import SimHost
from support.etcd import etcd_server, free_port

pytestmark = pytest.mark.skipif(not shutil.which("etcd"), reason="needs Debian's etcd-server (the README's test "
                                                                  "command installs it)")

VM = "cortex-a72-r0p3@6.12"
HOSTS = {"n1": "cortex-a72-r0p4@7.3", "n2": "cortex-a72-r0p4@7.3", "n3": "cortex-a72-r0p4@6.12",
         "n4": "cortex-a76@7.3", "n5": "cortex-a53@7.3"}


def doc(spec: str) -> dict:
    return probe(SimHost(spec), profile=spec)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with etcd_server(tmp_path_factory.mktemp("etcd")) as (endpoint, c):
        for node, spec in HOSTS.items():
            layout.put_host(c, "/f", node, doc(spec), f"{node}:7443")
        # n6: its document is not stored; n7: an unreadable summary; n8: a document altered after it was stored
        missing = doc("max@7.3")
        c.put("/f/hosts/n6", json.dumps(layout.summary("n6", missing, "n6:7443")))
        c.put("/f/hosts/n7", "{not json")
        altered = doc("neoverse-n1@7.3")
        layout.put_host(c, "/f", "n8", altered, "n8:7443")
        _, key = layout.keys("/f", "n8", altered)
        c.put(key, layout.canonical({**altered, "kernel_version": "9.9"}))
        yield endpoint, c


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_hosts_lists_every_host_and_the_distinct_documents(fleet, capsys):
    endpoint, _ = fleet
    code, out, _ = run(capsys, "fleet", "hosts", "--etcd", endpoint, "--prefix", "/f", "--json")
    assert code == 0
    got = json.loads(out)
    assert [h["node"] for h in got["hosts"]] == [f"n{i}" for i in range(1, 9)]
    assert got["documents"] == 4      # readable ones: n1 and n2 share one; n6's is absent, n7 names none, n8's altered
    n1, n2 = got["hosts"][:2]
    assert n1["caps"] == n2["caps"] and n1["profile"] == "cortex-a72-r0p4@7.3" and n1["cap239"] is True
    problems = {h["node"]: h.get("problem", "") for h in got["hosts"]}
    assert "is not stored" in problems["n6"] and "not JSON" in problems["n7"]
    assert "does not match its address" in problems["n8"]
    assert not any(problems[f"n{i}"] for i in range(1, 6))
    code, out, _ = run(capsys, "fleet", "hosts", "--etcd", endpoint, "--prefix", "/f", "--nodes", "n[12]")
    assert code == 0 and "2 host(s), 1 distinct capability document(s)" in out


def test_plan_ranks_migratable_then_changes_then_refusals_then_unknown(fleet, capsys):
    endpoint, _ = fleet
    code, out, _ = run(capsys, "fleet", "plan", VM, "--etcd", endpoint, "--prefix", "/f", "--json")
    assert code == 0
    got = json.loads(out)
    order = [(r["node"], r["verdict"]) for r in got["rows"]]
    assert order[:5] == [("n1", "migratable"), ("n2", "migratable"), ("n3", "migratable-with-changes"),
                         ("n5", "refused"), ("n4", "refused")]             # fewer refusals first
    assert {n for n, v in order[5:]} == {"n6", "n7", "n8"} and {v for _, v in order[5:]} == {"unknown"}
    assert got["counts"] == {"migratable": 2, "migratable-with-changes": 1, "refused": 2, "unknown": 3}
    rows = {r["node"]: r for r in got["rows"]}
    assert rows["n1"]["caps"] == rows["n2"]["caps"] and len(got["plans"]) == 4       # one plan per document
    plan = lambda n: got["plans"][rows[n]["caps"]]                                  # noqa: E731
    assert plan("n3")["guest_visible"][0].startswith("MIDR_EL1: 0x410fd083") and rows["n3"]["changes"] == 1
    assert rows["n4"]["refusals"] == len(plan("n4")["reasons"]) > rows["n5"]["refusals"] > 0
    assert "problem" in rows["n6"] and rows["n6"]["caps"] not in got["plans"]
    # the same plan as `invariantctl plan` computes host by host
    code, one, _ = run(capsys, "plan", "--from", VM, "--to", HOSTS["n4"], "--json")
    one = json.loads(one)
    assert code == 3 and plan("n4")["plan_digest"] == one["digest"]
    assert plan("n4")["reasons"] == [f"{e['register']}{'.' + e['field'] if e['field'] else ''}: {e['reason']}"
                                     for e in one["entries"] if e["verdict"] == "refuse"]
    code, text, _ = run(capsys, "fleet", "plan", VM, "--etcd", endpoint, "--prefix", "/f", "--limit", "3")
    lines = text.splitlines()
    assert lines[0].startswith(f"fleet plan: VM ") and "3 migratable" in lines[0] and "2 refused" in lines[0]
    assert "n3" in lines[4] and "MIDR_EL1" in lines[4] and "5 more" in lines[-1]


def test_plan_exit_codes(fleet, capsys):
    endpoint, _ = fleet
    code, _, _ = run(capsys, "fleet", "plan", VM, "--etcd", endpoint, "--prefix", "/f", "--nodes", "n4", "--nodes",
                     "n5")
    assert code == 3                                                         # no host takes it
    code, _, err = run(capsys, "fleet", "plan", VM, "--etcd", endpoint, "--prefix", "/nothing-here")
    assert code == 2 and "no hosts under /nothing-here" in err
    code, _, err = run(capsys, "fleet", "plan", VM, "--etcd", f"127.0.0.1:{free_port()}", "--prefix", "/f")
    assert code == 4 and err.startswith("invariantctl: etcd: reading /f/hosts/")
    code, _, err = run(capsys, "fleet", "plan", "no-such-vm.json", "--etcd", endpoint, "--prefix", "/f")
    assert code == 2 and "VM no-such-vm.json: no such file" in err
    code, _, err = run(capsys, "fleet", "plan", VM, "--etcd", endpoint, "--prefix", "/f", "--limit", "-1")
    assert code == 2 and "--limit -1" in err


def test_baseline_of_the_fleet_is_the_baseline_of_its_documents(fleet, capsys, tmp_path):
    endpoint, _ = fleet
    code, out, err = run(capsys, "fleet", "baseline", "--etcd", endpoint, "--prefix", "/f", "--json")
    assert "leaving out n6" in err and "leaving out n8" in err
    got = json.loads(out)
    assert got["baseline"]["hosts"] == ["n1", "n2", "n3", "n4", "n5"] and len(got["baseline"]["documents"]) == 4
    files = []
    for spec in dict.fromkeys(HOSTS.values()):
        p = tmp_path / f"{spec}.json"
        p.write_text(json.dumps(doc(spec)))
        files.append(str(p))
    code2, out2, _ = run(capsys, "baseline", *files, "--json")
    direct = json.loads(out2)
    assert code == code2 and got["values"] == direct["values"]
    assert got["baseline"]["lowered"] == direct["baseline"]["lowered"]


async def test_plan_a_vm_a_daemon_holds_by_name(fleet, nursery, pki, capsys):
    """`fleet plan NAME --daemon ADDR`: the VM as that daemon's planner sees it (rpc vmProfile), against the store."""
    import trio
    from support.cluster import call, start_cluster
    endpoint, _ = fleet
    cl = await start_cluster(nursery, pki)                 # node-a: cortex-a72-r0p3@6.12, the VM above's host
    with cl.client("a") as c:
        await call(c.create_vm, "web1", 2)
    conn = ["--daemon", f"127.0.0.1:{cl.a['rpc']}", "--ca", pki["ca"], "--cert", pki["operator"],
            "--server-name", "localhost", "--etcd", endpoint, "--prefix", "/f"]
    code = await trio.to_thread.run_sync(main, ["fleet", "plan", "web1", *conn, "--json"])
    got = json.loads(capsys.readouterr().out)
    assert code == 0 and got["vm"] == "web1"
    assert [(r["node"], r["verdict"]) for r in got["rows"]][:3] == [
        ("n1", "migratable"), ("n2", "migratable"), ("n3", "migratable-with-changes")]
    code = await trio.to_thread.run_sync(main, ["fleet", "plan", "no-such-vm", *conn])
    assert code == 2 and "VM no-such-vm on 127.0.0.1" in capsys.readouterr().err
