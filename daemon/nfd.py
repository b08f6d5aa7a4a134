"""Publish this host where schedulers look: a Kubernetes node-feature-discovery local feature file.

NFD's `local` source reads files in /etc/kubernetes/node-feature-discovery/features.d/: one `name=value` per line,
`#` comments, and the `# +expiry-time=RFC3339` directive after which NFD drops the file's labels (so a daemon that
died stops advertising). Names without a namespace become `feature.node.kubernetes.io/NAME`. The daemon rewrites the
file every `[nfd] interval` seconds, as a dot-file renamed into place (NFD never reads half a file):

    invariantd-profile=cortex-a72-r0p4-7.3     the host's profile (a simulated host's name; a real one: MIDR-kernel)
    invariantd-midr=410fd084                   MIDR_EL1 of the host's CPUs
    invariantd-kernel=7.3
    invariantd-cap239=true                     KVM_CAP_ARM_WRITABLE_IMP_ID_REGS (MIDR can be pinned)
    invariantd-baseline.a72-fleet=true         for each configured baseline: does this host's plan accept it

A scheduler selects on them (nodeAffinity: feature.node.kubernetes.io/invariantd-baseline.a72-fleet In [true]).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re

import trio

from ..protocol import schemas as S
from ..protocol.catalog import catalog
from ..protocol.negotiate import negotiate
from ..protocol.policy import Policy

log = logging.getLogger("invariantd.nfd")
_VALUE = re.compile(r"[^A-Za-z0-9_.-]+")


def label_value(text: str) -> str:
    """A Kubernetes label value: at most 63 of [A-Za-z0-9_.-], starting and ending alphanumeric."""
    return _VALUE.sub("-", text)[:63].strip("-_.") or "none"


def labels(caps_doc: dict, host: S.HostCapabilities | None, baselines: dict[str, S.VmProfile],
           policy: Policy) -> dict[str, str]:
    """The labels for this host; a baseline is accepted where this host's own plan for it is migratable."""
    cat = catalog()
    midr = dict(host.values).get(cat.id_of("MIDR_EL1"), 0) if host else 0
    kernel = str(caps_doc.get("kernel_version", ""))
    out = {"invariantd-profile": label_value(caps_doc.get("profile") or f"{midr:08x}-{kernel}"),
           "invariantd-midr": f"{midr:08x}", "invariantd-kernel": label_value(kernel),
           "invariantd-cap239": "true" if host and host.cap("KVM_CAP_ARM_WRITABLE_IMP_ID_REGS") > 0 else "false"}
    for name, vm in sorted(baselines.items()):
        ok = host is not None and negotiate(vm, host, policy).migratable
        out[f"invariantd-baseline.{label_value(name)}"] = "true" if ok else "false"
    return out


def render(lbls: dict[str, str], expires: dt.datetime) -> str:
    stamp = expires.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (f"# invariantd: written by the daemon, rewritten every interval (do not edit)\n"
            f"# +expiry-time={stamp}\n" + "".join(f"{k}={v}\n" for k, v in lbls.items()))


def write(path: str, text: str) -> None:
    """The file as a dot-file in the same folder, renamed into place."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_baselines(paths) -> dict[str, S.VmProfile]:
    """Baseline VM profiles by name (a file that cannot be read is logged and skipped: it is no reason to stop)."""
    out = {}
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                vm = S.vm_from_doc(json.load(f))
            out[vm.name] = vm
        except (OSError, ValueError, S.SchemaError) as e:
            log.warning("nfd: baseline %s skipped: %s", p, e)
    return out


async def publish(path: str, interval: float, caps_doc: dict, host: S.HostCapabilities | None, baseline_paths,
                  policy: Policy, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Keep the feature file current until cancelled (a failed write is logged and retried next interval)."""
    started = False
    while True:
        try:
            baselines = await trio.to_thread.run_sync(load_baselines, baseline_paths)
            text = render(labels(caps_doc, host, baselines, policy),
                          dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=3 * interval))
            await trio.to_thread.run_sync(write, path, text)
        except OSError as e:
            log.error("nfd: cannot write %s: %s", path, e)
        if not started:
            task_status.started()
            started = True
        await trio.sleep(interval)
