import json
import os

import pytest

from invariantd.client.cli import main


def test_probe_real_host_json(capsys):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine")
    assert main(["probe", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["api_version"] == 12 and doc["source"] == "kvm"
    assert "KVM_CAP_ONE_REG" in doc["caps"] and "one_reg" in doc


def test_probe_bad_sim_spec_is_a_usage_error(capsys):
    assert main(["probe", "--sim", "nonsense@6.12"]) == 2
    assert "no simulated host profile" in capsys.readouterr().err


def test_probe_help_mentions_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Exit codes" in capsys.readouterr().out


def test_probe_shows_sve_vector_lengths(capsys):
    assert main(["probe", "--sim", "a64fx@7.3"]) == 0
    out = capsys.readouterr().out
    assert "SVE vector lengths: 128, 256, 512 bits" in out and "reads differently: ID_AA64PFR0_EL1" in out
    assert main(["probe", "--sim", "cortex-a76@7.3"]) == 0
    assert "SVE vector lengths" not in capsys.readouterr().out
