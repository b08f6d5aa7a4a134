"""The peer data plane: the I/O shell around protocol.session for both roles.

Source (migrate_out), the VM still running: Hello -> read the destination's Capabilities -> read the VM
profile (first vCPU's registers, drift registers) -> compute the plan -> PlanProposal -> PlanAccept ->
Preflight. Only then the blackout: pause the VM -> read every vCPU's registers -> check that the VM profile
the plan was computed from is unchanged (ID / imp-ID / cache / FW registers are frozen once a vCPU has run;
anything else changed aborts cleanly, the VM resumes) -> stream in checksummed chunks -> StreamEnd -> wait
for the destination's Commit ("applied and verified") -> release the VM -> Commit.
Any failure before the destination's Commit leaves the VM running here (resumed if it was paused).

Destination (handle_incoming): Hello -> Capabilities -> check the plan (digest echoed in PlanAccept) ->
Preflight (the VM built: every vCPU, the VM-wide registers written and read back; staged.StagedApply) -> receive
chunks, each vCPU applied once complete (receive.py) -> read back every vCPU -> adopt the VM paused -> Commit -> run it only when the source's Commit arrives. A failure before
our Commit discards the VM (closed, never run); a broken link after it leaves the VM paused "in-doubt".

Plans: both daemons run the negotiation engine (protocol/negotiate.py). The destination sends its
HostCapabilities (Cap'n Proto); the source builds the VmProfile of its VM (ID / imp-ID / cache / FW register
values and vCPU features, plus the drift registers) and computes the Plan. A refused plan aborts here, with
the plan's reasons in the Abort, before anything moves. Otherwise the PlanProposal carries the VmProfile,
the source's Plan and its digest (plandigest.plan_digest); the destination recomputes the plan from the same
VmProfile and its own capabilities and policy, refuses when it is refused or when the digests differ (naming
the first differing entry), and echoes the digest in PlanAccept. The plan becomes the apply engine's
an ApplyProgram through program.compile_plan; pre-flight and the final apply are judged against the plan's
values (readback.plan_deviations).

The package, one module per part: link.py (one connection: Conn, errors, settings, the capabilities fetch and the
inquiry), chunks.py (vCPU state as the stream carries it), source.py (migrate_out), destination.py (handle_incoming,
answering inquiries). The VM as the negotiation sees it is daemon/vmprofile.py (trio-free: vmstate uses it too).
"""
from .chunks import _chunks, _regsets, stream_estimate
from .destination import PlanChecker, answer_inquiry, apply_report, handle_incoming
from .link import (CAPS_FORMAT, CAPS_ONLY, PLAN_FORMAT, RECEIVE_BYTES, TLS_RECORD, Conn, MigrationResult, PeerConfig,
                   PeerError, decode_caps, fetch_capabilities, inquire)
from ..vmprofile import (explain_mismatch, host_capabilities, profile_changes, profile_regsets, profile_view,
                      refusal_reasons, stream_deviations, vm_profile)
from .source import Planner, migrate_out

__all__ = ["CAPS_FORMAT", "CAPS_ONLY", "PLAN_FORMAT", "RECEIVE_BYTES", "TLS_RECORD", "Conn", "MigrationResult",
           "PeerConfig", "PeerError", "PlanChecker", "Planner", "answer_inquiry", "apply_report", "decode_caps",
           "explain_mismatch", "fetch_capabilities", "handle_incoming", "host_capabilities", "inquire", "migrate_out",
           "profile_changes", "profile_regsets", "profile_view", "refusal_reasons", "stream_deviations",
           "stream_estimate", "vm_profile", "_chunks", "_regsets"]
