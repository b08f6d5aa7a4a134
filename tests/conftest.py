"""Shared fixtures. tests/ is on sys.path so that test modules import their helpers from tests/support/."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """The one test PKI (daemon/pki.py, the daemon's own maker: its certificates carry the role URI SANs that
    trustme cannot issue): the cluster CA with node-a, node-b (peers), operator (an orchestrator) and nobody (no
    role); and another CA with one peer of its own, rogue ("other-ca", "rogue")."""
    from invariantd.daemon.pki import make_pki
    files = make_pki(tmp_path_factory.mktemp("pki"), nodes=("node-a", "node-b", "operator", "nobody"),
                     roleless=("nobody",))
    other = make_pki(tmp_path_factory.mktemp("other-pki"), nodes=("rogue",))
    return {**files, "other-ca": other["ca"], "rogue": other["rogue"]}
