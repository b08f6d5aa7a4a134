"""The destination's apply spread over a migration (StagedApply): the VM built and its VM-wide registers written in
pre-flight, each vCPU's state phase as its registers arrive, the read-back after the stream. The same steps as
apply.py's apply_vm (its _Run: one owner of the order, the program's actions and the events), driven from three
places instead of one.
"""
from __future__ import annotations

from typing import Sequence

from ..protocol.program import ApplyProgram
from ..protocol.regset import RegisterSet
from .apply import ApplyError, ApplyEvent, ApplyResult, _close_vm, _each, _Replay, _replay_error, _Run
from .kvm.backend import Backend, VcpuInit, threaded, worker_threads
from .readback import Mismatch, adjusted, verify


class NeedsFullApply(Exception):
    """A staged apply met an EBUSY ordering fault (ID registers frozen): its VM is closed; apply the streamed
    sets from scratch with apply_vm / apply_vm_async (a fresh VM, everything in order, one replay allowed)."""


class StagedApply:
    """The destination's apply spread over the migration, so that little of it falls inside the blackout:

        st = StagedApply(backend, n_vcpus, vm.values, program, features=feats)
        trial = st.prepare()           # pre-flight, the source's VM still running (worker thread)
        st.state(i, regs)              # during the stream, as each vCPU's registers arrive (worker threads)
        res = await st.finish()        # after the stream: every vCPU read back -> ApplyResult

    prepare() does what apply_vm does before the state phase - create the VM (cap 239 first when the program says
    so), create and initialise every vCPU, the VM-wide phase on every vCPU in order - with the VM profile's values
    (the plan was computed from them; the stream must carry the same, which the caller checks), then trials the
    profile's other registers on vCPU 0, and reads back the VM-wide registers of every vCPU and the trial: the
    pre-flight's answer, on the VM the migration will use instead of a scratch one. state(i) is the state phase of
    one vCPU; finish() reads back what the state phases wrote.
    Same program, events and errors as apply_vm; prepare() and finish() close the VM when they fail, state() does
    not (other threads may be applying other vCPUs: the caller closes once they all returned) and raises
    NeedsFullApply for an EBUSY replay. The VM is the caller's to close (close()) until finish() returned."""

    def __init__(self, backend: Backend, n_vcpus: int, profile_values: Sequence[tuple[int, int]],
                 program: ApplyProgram, *, init: VcpuInit | None = None, features: Sequence[int] | None = None,
                 vm_type: int = 0) -> None:
        self.backend, self.n = backend, n_vcpus
        self.events: list[ApplyEvent] = []
        values = list(profile_values)
        self.run = _Run(backend, {i: values for i in range(n_vcpus)}, program, self.events, init, features,
                        vm_type)
        self.run.regsets = dict(self.run.regsets)          # each vCPU's entry replaced by its streamed set
        self.applied: set[int] = set()
        self.replays = 0
        self.wide: frozenset = frozenset()

    def prepare(self) -> ApplyResult:
        """-> vCPU 0's trial (written, dropped, mismatches of the VM-wide phase and the trial) as an ApplyResult
        whose VM is this one (do not close it: close() does). Raises ApplyError (VM closed)."""
        for attempt in (0, 1):                               # an EBUSY replay: a fresh VM, once (as apply_vm)
            run = self.run
            try:
                run.prepare()
                mark = len(self.events)                      # the VM-wide phase's events are the VM's own
                # the VM-wide registers read back on every vCPU now, while the source VM runs: the state phase
                # writes none of them, so finish() reads back only what the stream brought
                mismatches = [m for i in run.indices[1:] for m in run.verify_vcpu(i)]
                run.phase_vcpu(0, False)                     # the profile's other registers, on vCPU 0
                mismatches = run.verify_vcpu(0) + mismatches
                break
            except _Replay as rp:
                self.close()
                if attempt:
                    raise _replay_error(rp, run.ap.phase, self.events) from None
                self.replays += 1
                self.run = _Run(run.backend, run.regsets, run.program, self.events, run.init, run.features,
                                run.vm_type)
            except BaseException:
                self.close()
                raise
        trial = ApplyResult(run.vm, {0: run.vcpus[0]}, {0: dict(run.written[0])}, {0: list(run.dropped[0])},
                            list(self.events), adjusted(mismatches)[0] if mismatches else [])
        wide = self.wide = run._wide_ids(tuple(r for r, _ in run.regsets[0]))
        run.written[0] = {r: v for r, v in run.written[0].items() if r in wide}   # the stream rewrites the rest
        run.dropped[0] = [r for r in run.dropped[0] if r in wide]
        run.whole.pop(0, None)
        del self.events[mark:]                               # the trial's: reported in pre-flight, not counted
        return trial

    def _verify_state(self, i: int) -> list[Mismatch]:
        """vCPU i's registers written since pre-flight, read back (the VM-wide ones were, in pre-flight): a set
        taken whole compared as bytes, else register by register."""
        run = self.run
        rs = run.whole.get(i)
        if rs is not None:
            return run.verify_whole(i, rs, self.wide)
        wide = self.wide
        return verify({i: run.vcpus[i]}, {i: {r: v for r, v in run.written[i].items() if r not in wide}})

    def state(self, i: int, regs: RegisterSet) -> None:
        """vCPU i's state phase with its streamed registers (one worker thread per vCPU at a time)."""
        if not 0 <= i < self.n:
            raise ApplyError(None, None, "-", "state", f"vCPU {i} streamed, the VM has {self.n}", vcpu=i,
                             phase="state", events=self.events)
        self.run.regsets[i] = regs
        try:
            self.run.phase_vcpu(i, False)
        except _Replay:
            raise NeedsFullApply() from None
        self.applied.add(i)

    async def finish(self, limiter=None) -> ApplyResult:
        """Every vCPU read back (worker threads on the real backend) -> the ApplyResult (its VM the caller's)."""
        import trio
        run = self.run
        missing = sorted(set(range(self.n)) - self.applied)
        if missing:
            self.close()
            raise ApplyError(None, None, "-", "state", f"no registers streamed for vCPU(s) "
                             f"{', '.join(map(str, missing[:8]))}", phase="state", events=self.events)
        try:
            if threaded(self.backend):
                per = await _each(self._verify_state, run.indices,
                                  limiter or trio.CapacityLimiter(worker_threads()))
            else:
                per = {i: self._verify_state(i) for i in run.indices}
        except BaseException:
            self.close()
            raise
        mismatches = [m for i in run.indices for m in per[i]]
        return run.result(mismatches, self.replays)

    def close(self) -> None:
        _close_vm(self.run.vm)
        self.run.vm = None
