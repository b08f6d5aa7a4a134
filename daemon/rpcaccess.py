"""Who may call which orchestrator RPC method: certificate roles (daemon/pki.py) -> methods, and the Caller an RPC
connection is bound to."""
from __future__ import annotations

from dataclasses import dataclass

#: Orchestrator methods (Python names) and the certificate roles (daemon/pki.py) that may call them. A daemon (peer
#: role) calls only what a VMM migration's source needs of its destination, and caps (plan); an orchestrator never
#: calls those peer steps. A caller on the unix socket is an orchestrator (the socket's group is the access control).
PEER_CALLS = frozenset({"caps", "prepare_vmm", "incoming_vmm", "vmm_status"})
ORCHESTRATOR_CALLS = frozenset({"caps", "peers", "list_vms", "inspect_vm", "create_vm", "remove_vm", "resolve_vm",
                                "plan", "migrate", "status", "list_migrations", "cancel", "wait", "list_vmms",
                                "vm_profile", "vmm_status", "migrate_vmm"})
METHOD_ROLES = {"peer": PEER_CALLS, "orchestrator": ORCHESTRATOR_CALLS}
BY_CALLER = frozenset({"create_vm"})          # take the caller (quota)


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of an RPC connection: its roles (certificate URI SANs; "orchestrator" on the unix
    socket) and a name (certificate name, or "uid N" on the unix socket: what quotas count by)."""
    roles: frozenset[str]
    name: str

    def may_not(self, method: str) -> str:
        if any(method in METHOD_ROLES.get(r, ()) for r in self.roles):
            return ""
        has = ", ".join(sorted(self.roles)) or "no role"
        need = " or ".join(r for r, calls in METHOD_ROLES.items() if method in calls)
        return f"{self.name} ({has}) may not call {method}: that takes the {need} role"
