"""node-feature-discovery: the daemon keeps a local feature file (dot-file renamed into place, an expiry) whose labels
say this host's profile and, per configured baseline, whether this host's own plan accepts it."""
from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import replace
from functools import partial

import trio

from invariantd.daemon.config import NfdSection, parse
from invariantd.daemon.nfd import label_value, render
from invariantd.daemon.server import make_backend, run
from invariantd.protocol import schemas as S
from invariantd.protocol.baseline import baseline
from support.cluster import cfg
from support.hostdocs import host


def profile_host(spec: str) -> S.HostCapabilities:
    from invariantd.daemon.probe import probe
    from invariantd.daemon.sim import SimHost
    return host(probe(SimHost(spec), spec))


def test_label_values_are_kubernetes_label_values():
    assert label_value("cortex-a72-r0p4@7.3") == "cortex-a72-r0p4-7.3"
    assert label_value("x" * 80) == "x" * 63 and label_value("@@") == "none"
    text = render({"a": "b"}, dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc))
    assert "# +expiry-time=2026-11-30T12:00:00Z\n" in text and text.endswith("a=b\n")


def test_the_config_section_is_checked():
    c = parse('[backend]\nkind="sim"\nsim_profile="cortex-a53@6.12"\n[peer]\ncert="a"\nca="b"\n'
              '[nfd]\npath="/tmp/x"\ninterval=30\nbaselines=["/etc/b.json"]\n')
    assert c.nfd == NfdSection("/tmp/x", 30.0, ("/etc/b.json",))


async def test_the_daemon_publishes_profile_and_baseline_acceptance(nursery, pki, tmp_path):
    fleet = baseline([profile_host(s) for s in ("cortex-a72-r0p3@7.3", "cortex-a72-r0p4@7.3")], name="a72-fleet")
    other = baseline([profile_host("neoverse-n1@7.3")], name="n1-only")
    paths = []
    for b in (fleet, other):
        paths.append(str(tmp_path / f"{b.profile.name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(S.vm_to_doc(b.profile), f)
    paths.append(str(tmp_path / "missing.json"))                  # logged and skipped, not fatal
    out = str(tmp_path / "features.d" / "invariantd")
    os.makedirs(os.path.dirname(out))
    c = replace(cfg("node-a", pki, "cortex-a72-r0p4@7.3"), nfd=NfdSection(out, 60.0, tuple(paths)))
    ports = await nursery.start(partial(run, c, backend=make_backend(c)))
    assert ports["nfd"] == out
    text = open(out).read()
    lines = dict(ln.split("=", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))
    assert lines["invariantd-profile"] == "cortex-a72-r0p4-7.3" and lines["invariantd-kernel"] == "7.3"
    assert lines["invariantd-midr"] == "410fd084" and lines["invariantd-cap239"] == "true"
    assert lines["invariantd-baseline.a72-fleet"] == "true"           # a72 revisions on cap-239 kernels
    assert lines["invariantd-baseline.n1-only"] == "false"            # another part: this host's plan refuses
    expiry = next(ln for ln in text.splitlines() if ln.startswith("# +expiry-time="))
    until = dt.datetime.strptime(expiry.split("=", 1)[1], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert 150 < (until - dt.datetime.now(dt.timezone.utc)).total_seconds() <= 180
    assert os.listdir(os.path.dirname(out)) == ["invariantd"]         # the dot-file was renamed away
    await trio.sleep(0)
