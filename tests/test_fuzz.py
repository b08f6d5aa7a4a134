"""Bounded fuzzing in CI (tests/support/fuzzing.py): every entry point for bytes or documents, 1,500 mutated inputs each
from valid seeds, fixed seed: each ends in its typed error or a valid result. bench/fuzz.py runs 1,000,000."""
from __future__ import annotations

import pytest

from support.fuzzing import run_target, targets

TARGETS = targets()


@pytest.mark.parametrize("t", TARGETS, ids=[t.name for t in TARGETS])
def test_mutated_inputs_end_in_typed_errors(t):
    for s in t.seeds:                    # the seeds themselves are valid
        t.run(s)
    typed, findings = run_target(t, 1500, seed=20261130)
    assert findings == []
    assert typed > 100                   # the mutations reach the error paths, not only valid inputs
