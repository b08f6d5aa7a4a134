"""The daemon's start: bad configuration and a failed start each give one line naming what is wrong (exit 2 for
the configuration, 1 for the start), and logs carry journald priorities under systemd."""
from __future__ import annotations

import logging
import socket

import pytest

from invariantd.daemon.pki import make_pki
from invariantd.daemon.config import ConfigError, load, parse
from invariantd.daemon.logs import JournalFormatter
from invariantd.daemon.server import main

BASE = """node = "a"
[backend]
kind = "sim"
sim_profile = "cortex-a72-r0p4@6.12"
[peer]
cert = "{cert}"
ca = "{ca}"
port = {port}
[metrics]
enabled = false
[rpc]
enabled = false
"""


@pytest.mark.parametrize("extra,match", [
    ("[timeouts]\napply = nan\n", "timeouts.apply: expected a positive, finite number of seconds, not nan"),
    ("[timeouts]\nphase = inf\n", "timeouts.phase: expected a positive, finite"),
    ("[timeouts]\ncommit = -1\n", "timeouts.commit: expected a positive"),
])
def test_timeouts_must_be_finite_and_positive(extra, match):
    with pytest.raises(ConfigError, match=match):
        parse(BASE.format(cert="c", ca="a", port=1) + extra)


def test_chunk_registers_zero_is_refused():
    text = BASE.format(cert="c", ca="a", port=1).replace("port = 1", "port = 1\nchunk_registers = 0")
    with pytest.raises(ConfigError, match="peer.chunk_registers must be at least 1"):
        parse(text)


def test_pipeline_vcpus_negative_is_refused_and_zero_turns_it_off():
    base = BASE.format(cert="c", ca="a", port=1)
    with pytest.raises(ConfigError, match="peer.pipeline_vcpus: expected an integer 0..65535"):
        parse(base.replace("port = 1", "port = 1\npipeline_vcpus = -1"))
    assert parse(base.replace("port = 1", "port = 1\npipeline_vcpus = 0")).peer.pipeline_vcpus == 0
    assert parse(base).peer.pipeline_vcpus == 32


def test_non_utf8_config_is_one_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_bytes(b"node = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load(str(p))


def test_missing_certificate_is_named(tmp_path, capsys):
    p = tmp_path / "c.toml"
    p.write_text(BASE.format(cert=tmp_path / "none.pem", ca=tmp_path / "none-ca.pem", port=0))
    assert main(["--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "peer.cert" in err and "none.pem': no such file" in err


def test_port_in_use_is_one_line_naming_the_listener(tmp_path, caplog):
    pki = make_pki(tmp_path)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    p = tmp_path / "c.toml"
    p.write_text(BASE.format(cert=pki["node-a"], ca=pki["ca"], port=port))
    try:
        with caplog.at_level(logging.ERROR):
            assert main(["--config", str(p)]) == 1
    finally:
        busy.close()
    [rec] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    msg = rec.getMessage()
    assert f"the peer listener cannot listen on 127.0.0.1:{port}" in msg and "Trio nursery" not in msg


def test_journal_lines_carry_their_priority():
    f = JournalFormatter(journal=True)
    rec = logging.LogRecord("invariantd.peer", logging.ERROR, __file__, 1, "migration %s aborted", ("m1",), None)
    assert f.format(rec) == "<3>invariantd.peer: migration m1 aborted"
    warn = logging.LogRecord("invariantd.peer", logging.WARNING, __file__, 1, "slow", (), None)
    assert f.format(warn) == "<4>invariantd.peer: slow"
    assert JournalFormatter(journal=False).format(rec) == "ERROR invariantd.peer: migration m1 aborted"


def test_a_wildcard_rpc_address_without_tls_is_refused_whatever_the_port():
    text = BASE.format(cert="c", ca="a", port=1).replace("[rpc]\nenabled = false", '[rpc]\nlisten = "0.0.0.0"\nport = 0')
    with pytest.raises(ConfigError, match="rpc.listen = '0.0.0.0' without rpc.tls"):
        parse(text)


def test_key_value_fields():
    from invariantd.daemon.logs import kv
    assert kv(migration="m1", vm="web 1", peer="") == 'migration=m1 vm="web 1" peer=-'
    assert kv(why='a "b"=c') == r'why="a \"b\"=c"'
