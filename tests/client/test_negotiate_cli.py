"""`invariantctl plan` / `baseline` via client/plan_cmd.register (wired here on a local parser, so the test
does not depend on client/cli.py's wiring). Exit codes: 0 migratable, 3 refused, 2 bad input."""
from __future__ import annotations

import argparse
import json

import pytest

from invariantd.client import plan_cmd
from invariantd.client.exits import CliError
from support.hostdocs import A72_R0P4, N1_R4P1, field_put, make_doc


def run(argv, capsys):
    p = argparse.ArgumentParser(prog="invariantctl")
    plan_cmd.register(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    try:
        code = args.func(args)
    except CliError as e:
        return e.code, "", str(e)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def files(tmp_path):
    def write(name, doc):
        p = tmp_path / name
        p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        return str(p)
    return write


def test_plan_pins_on_7x_exit_0(files, capsys):
    a, b = files("a.json", make_doc("7.3")), files("b.json", make_doc("7.3", {"MIDR_EL1": A72_R0P4}))
    code, out, _ = run(["plan", "--from", a, "--to", b], capsys)
    assert code == 0
    assert "MIDR_EL1" in out and " pin " in out and "MIGRATABLE" in out and "guest-visible changes: none" in out


def test_plan_refused_exit_3_with_reasons(files, capsys):
    a, b = files("a.json", make_doc("6.12")), files("b.json", make_doc("6.12", {"MIDR_EL1": N1_R4P1}))
    code, out, _ = run(["plan", "--from", a, "--to", b], capsys)
    assert code == 3 and "REFUSED" in out and "PartNum" in out


def test_plan_json_and_vm_profile_input(files, capsys):
    a, b = files("a.json", make_doc("6.1", masks=None)), files("b.json", make_doc("6.1", {"MIDR_EL1": A72_R0P4}, masks=None))
    code, out, _ = run(["plan", "--from", a, "--to", b, "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["format"] == "invariantd/plan@1" and doc["migratable"] and len(doc["digest"]) == 64
    assert any(e["register"] == "MIDR_EL1" and e["verdict"] == "override" for e in doc["entries"])
    # baseline output is a VM profile usable as --from
    code, out, _ = run(["baseline", a, b, "--name", "lab", "--json"], capsys)
    assert code == 0
    vm = files("vm.json", out)
    code, out, _ = run(["plan", "--from", vm, "--to", b], capsys)
    assert code == 0 and "plan: VM lab" in out


@pytest.mark.parametrize("content,match", [
    ("{not json", "malformed JSON"),
    ({"format": "something/else@1"}, "format is 'something/else@1'"),
])
def test_bad_input_exit_2_names_the_problem(files, capsys, content, match):
    good = files("good.json", make_doc("7.3"))
    bad = files("bad.json", content)
    code, _, err = run(["plan", "--from", bad, "--to", good], capsys)
    assert code == 2 and match in err and "--from" in err
    code, _, err = run(["plan", "--from", good, "--to", bad], capsys)
    assert code == 2 and match in err and "--to" in err


def test_unknown_register_in_vm_profile(files, capsys):
    vm = {"format": "invariantd/vm-profile@1", "name": "x", "values": {"MIDR_EL1": "0x410fd083", "BOGUS_EL1": "0x0"}}
    code, _, err = run(["plan", "--from", files("vm.json", vm), "--to", files("b.json", make_doc("7.3"))], capsys)
    assert code == 2 and "unknown register 'BOGUS_EL1'" in err


def test_bad_policy_and_missing_file(files, capsys):
    a = files("a.json", make_doc("7.3"))
    pol = files("p.toml", '[errata]\nmissing = "maybe"\n')
    code, _, err = run(["plan", "--from", a, "--to", a, "--policy", pol], capsys)
    assert code == 2 and "errata.missing" in err
    code, _, err = run(["plan", "--from", a + ".nope", "--to", a], capsys)
    assert code == 2 and "no such file" in err


def test_baseline_conflict_exit_3(files, capsys):
    reg = "ID_AA64ISAR0_EL1"
    a = files("a.json", make_doc("6.1", {reg: field_put(reg, "AES", 2)}, masks=None))
    b = files("b.json", make_doc("6.1", {reg: field_put(reg, "AES", 1)}, masks=None))
    code, out, _ = run(["baseline", a, b], capsys)
    assert code == 3 and "CONFLICT ID_AA64ISAR0_EL1.AES" in out


def test_plan_takes_shipped_host_profiles_by_name(capsys):
    """A76 -> N1: another part with the same features: migratable on 7.3 (MIDR pinned with cap 239), refused on
    6.12 (no cap 239); a name that is neither a file nor a shipped profile lists the shipped ones."""
    code, out, _ = run(["plan", "--from", "cortex-a76@7.3", "--to", "neoverse-n1@7.3"], capsys)
    assert code == 0 and " pin " in out and "MIGRATABLE" in out
    code, out, _ = run(["plan", "--from", "cortex-a76@6.12", "--to", "neoverse-n1@6.12"], capsys)
    assert code == 3 and "PartNum" in out
    code, _, err = run(["plan", "--from", "cortex-a99@7.3", "--to", "neoverse-n1@7.3"], capsys)
    assert code == 2 and "not a shipped host profile" in err and "a64fx@7.3" in err


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["values"].update({next(iter(d["values"])): hex(1 << 200)}), "does not fit 64 bits"),
    (lambda d: d["values"].update({next(iter(d["values"])): -5}), "does not fit 64 bits"),
    (lambda d: d.update(vcpu_init=[1, 2]), "vcpu_init must be an object"),
    (lambda d: d.update(caps=[1]), "malformed field"),
])
def test_odd_documents_are_one_line_exit_2(files, capsys, edit, match):
    doc = make_doc("7.3")
    edit(doc)
    code, _, err = run(["plan", "--from", files("a.json", doc), "--to", files("b.json", make_doc("7.3"))], capsys)
    assert code == 2 and match in err, err


def test_deeply_nested_json_is_one_line_exit_2(files, capsys):
    code, _, err = run(["plan", "--from", files("a.json", "[" * 100000 + "]" * 100000),
                        "--to", files("b.json", make_doc("7.3"))], capsys)
    assert code == 2 and "nested too deeply" in err


def test_the_report_says_the_verdict_first_wraps_and_filters(capsys, monkeypatch):
    """Summary first (result, what was refused and why, what the guest sees change), then the table; every line fits
    the terminal (COLUMNS); --verdict keeps only those rows in the table."""
    from invariantd.client.cli import main as cli_main
    monkeypatch.setenv("COLUMNS", "100")
    assert cli_main(["plan", "--from", "cortex-a72-r1p0@6.1", "--to", "cortex-a53@6.1"]) == 3
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("result: REFUSED") and out.index("refused:") < out.index("per register and field:")
    assert all(len(line) <= 100 for line in out if " " in line.strip()), max(out, key=len)
    assert cli_main(["plan", "--from", "cortex-a72-r1p0@6.1", "--to", "cortex-a53@6.1", "--verdict", "refuse"]) == 3
    out = capsys.readouterr().out.splitlines()
    table = out[out.index("per register and field (verdict refuse):") + 2:]
    rows = [ln for ln in table if ln and not ln.startswith((" ", "(", "digest"))]
    assert rows and all("refuse" in r.split() for r in rows)
