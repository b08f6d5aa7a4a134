"""What invariantctl prints for people: capability summaries, plan tables, the migration progress bar."""
from __future__ import annotations

import shutil
import sys
import textwrap
from contextlib import contextmanager
from typing import Sequence

from ..protocol.schemas import Verdict


def print_caps_summary(doc: dict, label: str) -> None:
    """The human header of a capability document (probe here, or a daemon's / peer's via `caps`)."""
    one_reg = doc.get("one_reg", (doc.get("caps") or {}).get("KVM_CAP_ONE_REG"))
    print(f"{label}: {doc.get('source')} {doc.get('profile') or ''}   arch: {doc.get('arch')}   "
          f"kernel: {doc.get('kernel_release')}   KVM API {doc.get('api_version')}   ONE_REG: {'yes' if one_reg else 'no'}")
    print("caps: " + ", ".join(f"{k.replace('KVM_CAP_', '')}={v}" for k, v in (doc.get("caps") or {}).items()))
    if doc.get("arch") != "aarch64":
        return
    if doc.get("sim_era"):
        print(f"simulated kernel era: {doc['sim_era']}")
    print(f"per-CPU MIDR: {', '.join(doc.get('cpu_midrs') or []) or 'n/a'}   registers listed: "
          f"{len(doc.get('reg_list') or [])}   writable masks: "
          f"{'not offered' if doc.get('writable_masks') is None else len(doc['writable_masks'])}")
    if doc.get("sve_vls"):
        from ..protocol.catalog import sve_vqs
        vls = ", ".join(str(128 * q) for q in sve_vqs(int(doc["sve_vls"], 16)))
        print(f"SVE vector lengths: {vls} bits   an SVE vCPU reads differently: "
              f"{', '.join(_reg_name(k) for k in doc.get('sve_values') or {}) or 'nothing'}")


def _reg_name(hex_id: str) -> str:
    from ..protocol.catalog import catalog
    return catalog().name(int(hex_id, 16))


VERDICTS = tuple(v.value for v in Verdict)


def print_plan_doc(doc: dict, verbose: bool = False, out=None, verdicts: Sequence[str] = (),
                   width: int | None = None) -> None:
    """A plan (its document, schemas.plan_to_doc: `invariantctl plan` and `plan-vm` alike) for people: the verdict
    first, then what was refused and why, what the guest will see change, notes; then the per-register table
    (`verdicts` keeps only those verdicts, `verbose` adds the identical registers), every line wrapped to `width`
    (default: the terminal's)."""
    out = out or sys.stdout
    width = width or max(80, shutil.get_terminal_size((120, 24)).columns)
    w = lambda s="": print(s, file=out)   # noqa: E731

    def wrapped(text: str, indent: str) -> None:
        w(textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent + "    ",
                        break_on_hyphens=False, break_long_words=False))
    entries = doc["entries"]
    refused = [e for e in entries if e["verdict"] == "refuse"]
    w(f"plan: VM {doc['vm']} -> {doc['destination']}   policy {doc['policy']}")
    if doc["migratable"]:
        w("result: MIGRATABLE" + (" (enable cap 239 before creating vCPUs)" if doc["enable_cap239"] else ""))
    else:
        regs = sorted({e["register"] for e in refused})
        wrapped(f"result: REFUSED ({len(regs)} register(s): {', '.join(regs)}; "
                f"{sum(1 for e in refused if e['field'])} field(s)) - exit 3", "")
        w("refused:")
        for e in refused:
            where = e["register"] + (f".{e['field']}" if e["field"] else "")
            wrapped(f"{where}: {_hexpair(e)} - {e['reason']}", "  ")
    w("guest-visible changes: " + ("none" if not doc["guest_visible"] else ""))
    for g in doc["guest_visible"]:
        wrapped(g, "  - ")
    if doc.get("big_little"):
        wrapped(f"big.LITTLE destination: plan assumes cluster MIDR {doc['assumed_cluster']} on CPUs "
                f"{', '.join(map(str, doc['cluster_cpus']))}", "")
    for n in doc["notes"]:
        wrapped(f"note: {n}", "")
    rows = [e for e in entries if (verbose or e["verdict"] != "identical") and (not verdicts or e["verdict"] in verdicts)]
    shown = f" (verdict {', '.join(verdicts)})" if verdicts else ""
    w(f"\nper register and field{shown}:")
    cells = []
    for e in rows:
        src, dst = int(e["source"], 16), int(e["destination"], 16)
        cells.append((e["register"], e["field"] or "-", f"{src:#x}", f"{dst:#x}", e["verdict"], e["reason"]))
    hdr = ("register", "field", "source", "destination", "verdict", "reason")
    cols = [max([len(hdr[k])] + [len(c[k]) for c in cells]) for k in range(5)]
    head = "".join(f"{hdr[k]:<{cols[k]}}  " for k in range(5))
    beside = width - len(head) >= 40           # the reason beside the row, else on the lines below it
    w(head + hdr[5] if beside else head.rstrip() + "\n    reason")
    for c in cells:
        row = "".join(f"{c[k]:<{cols[k]}}  " for k in range(5))
        if beside:
            lines = textwrap.wrap(c[5], width - len(head), break_on_hyphens=False, break_long_words=False) or [""]
            w(row + lines[0])
            for more in lines[1:]:
                w(" " * len(head) + more)
        else:
            w(row.rstrip())
            wrapped(c[5], "    ")
    same = sum(1 for e in entries if e["verdict"] == "identical")
    if same and not verbose:
        w(f"({same} registers identical on both sides; --all lists them)")
    w(f"digest: sha256:{doc['digest']}")


def _hexpair(e: dict) -> str:
    return f"{int(e['source'], 16):#x} -> {int(e['destination'], 16):#x}"


#: the phases a migration goes through, in order (daemon/migrations.py; a QEMU migration's: daemon/vmm/service.py)
PHASES = ("connecting", "handshake", "plan", "preflight", "agent", "ram", "switchover", "stream", "apply", "commit",
          "done")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def progress_fields(st: dict) -> dict:
    """What the bar shows for one status: how far along the phases (the stream phase by vCPUs sent), the bytes and
    their rate, and the migration's own elapsed time (the daemon's clock, not this client's)."""
    phase = st["phase"]
    step = PHASES.index(phase) if phase in PHASES else 0
    if phase == "stream" and st["vcpus_total"]:
        step += st["vcpus_done"] / st["vcpus_total"]
    secs = st["elapsed_ms"] / 1000
    moved = st["bytes_sent"] + st["bytes_received"]
    return {"completed": min(step, len(PHASES) - 1), "phase": phase,
            "vcpus": f"vCPUs {st['vcpus_done']}/{st['vcpus_total']}",
            "bytes": f"{_size(moved)} at {_size(moved / secs) + '/s' if secs > 0 else '-'}",
            "elapsed": f"{int(secs // 3600)}:{int(secs // 60) % 60:02d}:{secs % 60:04.1f}"}


@contextmanager
def progress_bar(out=None):
    """A rich progress bar for a migration, driven by its phases and bytes; yields (update(status_dict), progress)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn
    console = Console(file=out or sys.stderr)
    with Progress(TextColumn("[bold]{task.fields[phase]:<10}"), BarColumn(), TextColumn("{task.fields[vcpus]}"),
                  TextColumn("{task.fields[bytes]}"), TextColumn("{task.fields[elapsed]}"), console=console,
                  transient=False) as prog:
        task = prog.add_task("migrate", total=len(PHASES) - 1, completed=0, phase="connecting", vcpus="",
                             bytes="", elapsed="0:00:00.0")

        def update(st: dict) -> None:
            prog.update(task, **progress_fields(st))
        yield update, prog


def print_fleet_hosts(hosts: list[dict], documents: int, out=None) -> None:
    """`fleet hosts`: one line per host published to etcd."""
    out = out or sys.stdout
    print(f"{len(hosts)} host(s), {documents} distinct capability document(s)", file=out)
    print(f"{'node':<24} {'profile':<26} {'kernel':<8} {'midr':<12} {'cap239':<6} {'peer':<22} document", file=out)
    for h in hosts:
        print(f"{h['node']:<24} {h['profile']:<26} {h['kernel']:<8} {h['midr']:<12} {'yes' if h['cap239'] else 'no':<6} "
              f"{h['peer']:<22} {h['caps'][:12] or '-'}", file=out)
        if h.get("problem"):
            print(f"    {h['problem']}", file=out)


def print_fleet_plan(head: dict, rows: list, limit: int = 0, out=None, width: int | None = None) -> None:
    """`fleet plan`: the counts first, then every host ranked (daemon/fleet.Row), one line each: what the guest
    sees change, or the first refusal (and how many more), cut to the terminal's width."""
    out = out or sys.stdout
    width = width or max(80, shutil.get_terminal_size((120, 24)).columns)
    c = head["counts"]
    movable = c["migratable"] + c["migratable-with-changes"]
    print(f"fleet plan: VM {head['vm']} against {head['hosts']} host(s) ({head['documents']} distinct document(s)): "
          f"{movable} migratable ({c['migratable']} with no change the guest sees, {c['migratable-with-changes']} "
          f"with changes), {c['refused']} refused, {c['unknown']} not plannable", file=out)
    shown = rows[:limit] if limit else rows
    print(f"{'#':>5}  {'verdict':<23} {'node':<24} {'profile':<26} what", file=out)
    for i, r in enumerate(shown, 1):
        if r.reasons:
            what = r.reasons[0] + (f" (+{len(r.reasons) - 1} more)" if len(r.reasons) > 1 else "")
        else:
            what = "; ".join(r.changes) or "-"
        line = f"{i:>5}  {r.verdict:<23} {r.host.node:<24} {r.host.summary.get('profile', ''):<26} {what}"
        print(line if len(line) <= width else line[:width - 1] + "\u2026", file=out)
    if limit and len(rows) > limit:
        print(f"  ... {len(rows) - limit} more (--limit 0 lists every host; --json for all details)", file=out)
