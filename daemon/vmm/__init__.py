"""VMs a real VMM runs (QEMU first): the in-process agent (agent.c, loaded with LD_PRELOAD), the
`invariantd-qemu` wrapper that loads it (wrapper.py) and the daemon's side of the agent socket (hub.py).

KVM answers EIO to every VM / vCPU ioctl from a process other than the VM's creator (virt/kvm/kvm_main.c:
kvm->mm != current->mm; measured on real 6.12 / 7.3 kernels for a forked child, pidfd_getfd(2) and SCM_RIGHTS),
so the daemon never acts on a VMM's vCPUs itself: the agent runs the apply program inside the VMM.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


class AgentMissing(RuntimeError):
    """The agent library was not built (pip install builds it; a source tree without a build has none)."""


def agent_library() -> Path:
    """Path of the built agent (LD_PRELOAD it into the VMM). $INVARIANTD_AGENT_LIB overrides."""
    env = os.environ.get("INVARIANTD_AGENT_LIB")
    if env:
        return Path(env)
    here = Path(str(resources.files(__package__)))
    found = sorted(here.glob("_ivdagent*.so"))
    if not found:
        raise AgentMissing(f"no _ivdagent*.so in {here}: install the package (pip install .) to build the VMM agent "
                           f"from {here / 'agent.c'}, or set INVARIANTD_AGENT_LIB")
    return found[0]
