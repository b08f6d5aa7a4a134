"""invariantctl orchestration subcommands: talk to a running invariantd over its Cap'n Proto RPC.

  caps [HOST]                 capability document of the daemon (or of its peer HOST)
  vms                         VMs the daemon holds
  create-vm NAME --vcpus N    create a VM (simulated host or real /dev/kvm, whatever the daemon runs on)
  inspect-vm NAME             state, vCPUs, features, ID register summary
  peers                       the daemon's configured peers
  plan-vm VM --to HOST        the negotiation plan for moving VM to peer HOST (the offline planner stays
                              `plan --from CAPS --to CAPS`)
  migrate VM --to HOST        migrate, with a progress bar (--json: one JSON document at the end)
  status [MIGRATION]          one migration, or all of them
  cancel MIGRATION            cancel before the destination commits (the VM resumes on the source)

Daemon address: --daemon HOST:PORT or unix:/path; default $INVARIANTD_ADDR or 127.0.0.1:7444.
Mutual TLS (when the daemon's rpc.tls = true): --ca/--cert/--key or $INVARIANTD_CA/_CERT/_KEY.

Exit codes: client/exits.py (and every command's --help).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# the RPC client (trio, TLS) is imported by the commands that use it: `invariantctl plan`, `fleet` or `--help` do
# not pay for it
from . import exits
from .exits import Exit
from .render import VERDICTS, print_caps_summary, print_plan_doc, progress_bar

EPILOG = exits.table()


def _client(args):
    from ..daemon.rpcclient import Client, RpcError, client_ssl, default_addr
    ca = args.ca or os.environ.get("INVARIANTD_CA")
    cert = args.cert or os.environ.get("INVARIANTD_CERT")
    key = args.key or os.environ.get("INVARIANTD_KEY")
    try:
        ctx = client_ssl(cert, key, ca)
    except (OSError, ValueError) as e:
        raise RpcError("badRequest", f"TLS files: {e}") from None
    return Client(args.daemon or default_addr(), ctx, server_hostname=args.server_name)


def _dump(obj) -> None:
    json.dump(obj, sys.stdout, indent=1, default=lambda b: b.hex() if isinstance(b, bytes) else str(b))
    sys.stdout.write("\n")


def _handled(fn):
    def wrapper(args) -> int:
        from ..daemon.rpcclient import RpcError
        try:
            return fn(args)
        except RpcError as e:
            if getattr(args, "json", False):
                _dump({"error": {"kind": e.kind, "message": e.message}, "exit_code": int(exits.for_kind(e.kind))})
            print(f"invariantctl: {e}", file=sys.stderr)
            return exits.for_kind(e.kind)
    return wrapper


# --- output helpers ---------------------------------------------------------------------------------------------
def _vm_line(v: dict) -> str:
    line = (f"{v['name']:<24} {v['state']:<10} {v['vcpus']:>5}  {v['arch']:<8} {v['origin']:<9} "
            f"{','.join(v['features']) or '-'}")
    if v.get("waiting"):
        line += f"\n    {v['waiting']}"
    return line


# --- commands ---------------------------------------------------------------------------------------------------
@_handled
def cmd_caps(args) -> int:
    with _client(args) as c:
        doc = c.caps(args.host or "")
    if args.json:
        _dump(doc)
        return Exit.OK
    print_caps_summary(doc, args.host or "daemon")
    return Exit.OK


@_handled
def cmd_vms(args) -> int:
    with _client(args) as c:
        vms = c.list_vms()
    if args.unresolved:
        vms = [v for v in vms if v["state"] in ("in-doubt", "released")]
    if args.json:
        _dump(vms)
        return Exit.OK
    print(f"{'name':<24} {'state':<10} {'vCPUs':>5}  {'arch':<8} {'origin':<9} features")
    for v in vms:
        print(_vm_line(v))
    if not vms:
        print("(no VMs)")
    return Exit.OK


@_handled
def cmd_create_vm(args) -> int:
    with _client(args) as c:
        v = c.create_vm(args.name, args.vcpus, args.feature or ())
    if args.json:
        _dump(v)
    else:
        print(f"created {v['name']}: {v['vcpus']} vCPU(s), {v['arch']}, features {','.join(v['features']) or '-'}, "
              f"state {v['state']}")
    return Exit.OK


@_handled
def cmd_inspect_vm(args) -> int:
    with _client(args) as c:
        v = c.inspect_vm(args.name)
    if args.json:
        _dump(v)
        return Exit.OK
    print(_vm_line(v))
    print(f"history: {' '.join(v['history']) or '-'}   registers on vCPU 0: {v['register_count']}")
    if v["id_registers"]:
        print(f"{'register':<34} {'value':<20} fields")
        for r in v["id_registers"]:
            print(f"{r['name']:<34} {r['value']:<20} {r['fields']}")
    return Exit.OK


@_handled
def cmd_peers(args) -> int:
    with _client(args) as c:
        p = c.peers()
    if args.json:
        _dump(p)
        return Exit.OK
    print(f"node {p['node']}")
    for x in p["peers"]:
        print(f"  {x['name']:<20} peer {x['address']:<24} rpc {x['rpc'] or '-'}")
    if not p["peers"]:
        print("  (no peers configured)")
    return Exit.OK


@_handled
def cmd_plan_vm(args) -> int:
    with _client(args) as c:
        p = c.plan(args.vm, args.to)
    if args.json:
        _dump(p)
    else:
        print_plan_doc(p["plan"], verbose=args.all, verdicts=args.verdict or ())
    return Exit.OK if p["migratable"] else Exit.REFUSED


def _status_line(st: dict) -> str:
    err = f"  {st['error']['kind']}: {st['error']['message']}" if st["error"] else ""
    return (f"{st['id']}  {st['vm']} -> {st['to']}  {st['state']:<9} phase {st['phase']:<9} vCPUs "
            f"{st['vcpus_done']}/{st['vcpus_total']}  {st['bytes_sent']} B sent  {st['elapsed_ms']} ms"
            f"{_qemu_part(st.get('detail') or {})}{err}")


def _qemu_part(detail: dict) -> str:
    """A QEMU migration's own figures (migrate-vmm): QEMU's downtime and, of it, invariantd's hold at the switchover
    (QEMU's pre-switchover event -> noticed, decided, journaled; migrate-continue's answer is QEMU's device save)."""
    q, hold = detail.get("qemu") or {}, detail.get("switchover") or {}
    out = f"  QEMU downtime {q['downtime']} ms" if q.get("downtime") is not None else ""
    steps = [hold.get(k) for k in ("noticed", "decided", "journal")]
    if any(v is not None for v in steps):
        out += f"  switchover held {sum(v or 0 for v in steps):.1f} ms"
    return out


def _still_running(mid: str, waited: float) -> int:
    """--timeout passed before the migration ended: it has not failed, this client only stopped waiting."""
    print(f"invariantctl: migration {mid} is still running after {waited:g}s (not failed); follow it with "
          f"`invariantctl status {mid}`", file=sys.stderr)
    return Exit.RUNNING


def _end_code(st: dict) -> int:
    if st["state"] == "committed":
        return Exit.OK
    if st["state"] == "running":
        return Exit.OK
    kind = (st["error"] or {}).get("kind", "migrationFailed")
    code = exits.BY_KIND.get(kind, Exit.FAILED)
    return code if code in (Exit.REFUSED, Exit.UNREACHABLE, Exit.KVM) else Exit.FAILED


@_handled
def cmd_migrate(args) -> int:
    import time
    with _client(args) as c:
        mid = c.migrate(args.vm, args.to)
        if args.no_wait:
            if args.json:
                _dump({"id": mid})
            else:
                print(mid)
            return Exit.OK
        deadline = time.monotonic() + args.timeout
        if args.json or not sys.stderr.isatty() and not args.progress:
            st = c.wait(mid, int(args.timeout * 1000))
        else:
            with progress_bar() as (update, _):
                while True:
                    st = c.status(mid)
                    update(st)
                    if st["state"] != "running" or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
    if args.json:
        _dump(st)
    else:
        print(_status_line(st))
    return _end_code(st) if st["state"] != "running" else _still_running(mid, args.timeout)


@_handled
def cmd_remove_vm(args) -> int:
    with _client(args) as c:
        c.remove_vm(args.name)
    _dump({"name": args.name, "state": "removed"}) if args.json else print(f"removed {args.name}")
    return Exit.OK


@_handled
def cmd_resolve(args) -> int:
    with _client(args) as c:
        vm = c.resolve_vm(args.vm, args.peer, "resume" if args.resume else "discard")
    if args.json:
        _dump(vm)
    else:
        print(f"{args.vm}: {'resumed here' if args.resume else 'discarded here'} ({vm['state']})")
    return Exit.OK


@_handled
def cmd_vmms(args) -> int:
    with _client(args) as c:
        vmms = c.list_vmms()
    if args.json:
        _dump(vmms)
        return Exit.OK
    print(f"{'pid':>7} {'role':<12} {'VM':<20} {'migration':<34} {'vCPUs':>5} {'events':>6}  connected")
    for v in vmms:
        print(f"{v['pid']:>7} {v['role']:<12} {v['vm'] or '-':<20} {v['migration'] or '-':<34} "
              f"{len(v['vcpus_snapshotted']):>5} {len(v['events']):>6}  {'yes' if v['connected'] else 'no'}")
    if not vmms:
        print("(no VMM agents have reported: start QEMU with invariantd-qemu and set [agent] socket)")
    return Exit.OK


@_handled
def cmd_migrate_vmm(args) -> int:
    with _client(args) as c:
        mid = c.migrate_vmm(args.vm, args.to, args.qmp, args.uri, args.dest_qmp or "")
        if args.no_wait:
            _dump({"id": mid}) if args.json else print(mid)
            return Exit.OK
        st = c.wait(mid, int(args.timeout * 1000))
    if args.json:
        _dump(st)
    else:
        print(_status_line(st))
    return _end_code(st) if st["state"] != "running" else _still_running(mid, args.timeout)


@_handled
def cmd_status(args) -> int:
    with _client(args) as c:
        sts = [c.status(args.migration)] if args.migration else c.list_migrations()
    if args.json:
        _dump(sts[0] if args.migration else sts)
    else:
        for st in sts:
            print(_status_line(st))
        if not sts:
            print("(no migrations)")
    return _end_code(sts[0]) if args.migration else Exit.OK


@_handled
def cmd_cancel(args) -> int:
    with _client(args) as c:
        st = c.cancel(args.migration)
    if args.json:
        _dump(st)
    else:
        print(_status_line(st))
    return Exit.OK if st["state"] == "cancelled" else _end_code(st)


def connection_options() -> argparse.ArgumentParser:
    """The daemon connection options (a parent parser): every daemon command's, and `fleet plan --daemon`'s."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("daemon connection")
    g.add_argument("--daemon", metavar="ADDR", default=None,
                   help="HOST:PORT or unix:/path (default $INVARIANTD_ADDR or 127.0.0.1:7444)")
    g.add_argument("--ca", metavar="PEM", help="cluster CA: enables mutual TLS (or $INVARIANTD_CA)")
    g.add_argument("--cert", metavar="PEM", help="client certificate (+ key) (or $INVARIANTD_CERT)")
    g.add_argument("--key", metavar="PEM", help="client key when not in --cert (or $INVARIANTD_KEY)")
    g.add_argument("--server-name", metavar="NAME", help="TLS name to verify (default: the address's host)")
    return common


def register(sub) -> None:
    common = connection_options()
    common.add_argument("--json", action="store_true", help="machine-readable output")
    kw = dict(parents=[common], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)

    p = sub.add_parser("caps", help="capability document of the daemon or of one of its peers", **kw)
    p.add_argument("host", nargs="?", default="", metavar="HOST", help="peer name (default: the daemon itself)")
    p.set_defaults(func=cmd_caps)
    p = sub.add_parser("vms", help="VMs the daemon holds", **kw)
    p.add_argument("--unresolved", action="store_true", help="only in-doubt and released VMs (what resolve / "
                                                             "remove-vm are for)")
    p.set_defaults(func=cmd_vms)
    p = sub.add_parser("remove-vm", help="remove a running VM of the daemon's own, or a released one", **kw)
    p.add_argument("name", help="the VM's name")
    p.set_defaults(func=cmd_remove_vm)
    p = sub.add_parser("resolve", help="resolve an in-doubt or released VM after asking the peer what it holds",
                       **kw)
    p.add_argument("vm", help="the VM's name")
    p.add_argument("--peer", required=True, metavar="HOST", help="the other host of its migration")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--resume", action="store_true", help="run it here (only if the peer holds no copy that can run)")
    how.add_argument("--discard", action="store_true", help="drop the copy here (only if the peer runs it)")
    p.set_defaults(func=cmd_resolve)
    p = sub.add_parser("create-vm", help="create a VM on the daemon's backend", **kw)
    p.add_argument("name", help="a name for the VM (letters, digits, . _ -; up to 64)")
    p.add_argument("--vcpus", type=int, default=1, metavar="N", help="vCPUs (default: %(default)s)")
    p.add_argument("--feature", action="append", metavar="F", help="arm64 vCPU init feature (repeatable; "
                                                                    "default: the host's base features)")
    p.set_defaults(func=cmd_create_vm)
    p = sub.add_parser("inspect-vm", help="one VM: state, vCPUs, features, ID registers", **kw)
    p.add_argument("name", help="the VM's name")
    p.set_defaults(func=cmd_inspect_vm)
    p = sub.add_parser("peers", help="the daemon's configured peers", **kw)
    p.set_defaults(func=cmd_peers)
    p = sub.add_parser("plan-vm", help="the plan for migrating a VM the daemon holds to one of its peers "
                                       "(offline planner: `plan --from --to`)", **kw)
    p.add_argument("vm", help="the VM's name")
    p.add_argument("--to", required=True, metavar="HOST", help="peer name ([peers] in the daemon's config)")
    p.add_argument("--all", action="store_true", help="also list identical registers")
    p.add_argument("--verdict", action="append", metavar="V", choices=VERDICTS,
                   help=f"list only entries with this verdict in the table (repeatable; one of {', '.join(VERDICTS)})")
    p.set_defaults(func=cmd_plan_vm)
    p = sub.add_parser("migrate", help="migrate a VM to a peer (progress bar; --json for a document)", **kw)
    p.add_argument("vm", help="the VM's name")
    p.add_argument("--to", required=True, metavar="HOST", help="peer name ([peers] in the daemon's config)")
    p.add_argument("--no-wait", action="store_true", help="print the migration id and return")
    p.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="give up waiting after S seconds")
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser("vmms", help="VMMs whose invariantd agent reported to the daemon (QEMU via invariantd-qemu)",
                       **kw)
    p.set_defaults(func=cmd_vmms)
    p = sub.add_parser("migrate-vmm", help="migrate a VM QEMU runs: plan and pre-flight before any RAM moves, "
                                           "switchover held until the destination agent applied the plan", **kw)
    p.add_argument("vm", help="the VM's name (QEMU -name)")
    p.add_argument("--to", required=True, metavar="HOST", help="peer name ([peers], with its rpc address)")
    p.add_argument("--qmp", required=True, metavar="PATH", help="the source QEMU's QMP unix socket")
    p.add_argument("--uri", required=True, metavar="URI", help="QEMU migration URI, e.g. tcp:host-b:4444")
    p.add_argument("--dest-qmp", metavar="PATH", help="the destination QEMU's QMP socket on the peer (started with "
                                                      "-incoming defer): the peer daemon sets it listening")
    p.add_argument("--no-wait", action="store_true", help="print the migration id and return")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="give up waiting after S seconds")
    p.set_defaults(func=cmd_migrate_vmm)
    p = sub.add_parser("status", help="one migration (or all)", **kw)
    p.add_argument("migration", nargs="?", default="", metavar="ID", help="a migration id (default: all of them)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("cancel", help="cancel a migration before the destination commits", **kw)
    p.add_argument("migration", metavar="ID", help="the migration id (`migrate` printed it)")
    p.set_defaults(func=cmd_cancel)
