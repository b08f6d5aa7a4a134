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


def test_every_command_and_option_has_help_and_a_version_is_printed(capsys):
    """--help is the manual: every command, option and argument of invariantctl says what it is for."""
    import argparse

    from invariantd.client.cli import build_parser
    missing = []

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                helps = {ca.dest: ca.help for ca in a._choices_actions}
                for name, sp in a.choices.items():
                    if not helps.get(name):
                        missing.append(" ".join(path + [name]))
                    walk(sp, path + [name])
            elif not isinstance(a, (argparse._HelpAction, argparse._VersionAction)) and not a.help:
                missing.append(f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}")
    walk(build_parser(), ["invariantctl"])
    assert missing == []
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0 and capsys.readouterr().out.startswith("invariantctl ")
