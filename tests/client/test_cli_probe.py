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


def test_progress_is_phases_bytes_rate_and_the_migrations_own_elapsed_time():
    import io

    from invariantd.client.render import PHASES, progress_bar, progress_fields
    st = {"phase": "stream", "vcpus_done": 3, "vcpus_total": 4, "bytes_sent": 3 << 20, "bytes_received": 1 << 20,
          "elapsed_ms": 2500}
    f = progress_fields(st)
    assert f["completed"] == PHASES.index("stream") + 0.75
    assert f["bytes"] == "4.0 MiB at 1.6 MiB/s" and f["elapsed"] == "0:00:02.5" and f["vcpus"] == "vCPUs 3/4"
    assert progress_fields({**st, "phase": "apply"})["completed"] == PHASES.index("apply")   # not full before done
    assert progress_fields({**st, "phase": "done"})["completed"] == len(PHASES) - 1
    out = io.StringIO()
    with progress_bar(out) as (update, _):
        update({**st, "phase": "apply", "elapsed_ms": 61_000})
    assert "apply" in out.getvalue() and "0:01:01.0" in out.getvalue()
