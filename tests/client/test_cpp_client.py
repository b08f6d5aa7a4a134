"""An orchestrator in another language: client/examples/list_vms.c++ (stock Cap'n Proto C++, Debian's capnproto and
libcapnp-dev), built from the shipped schemas and run against a real daemon's unix socket."""
from __future__ import annotations

import shutil
import subprocess
from functools import partial
from importlib import resources
from pathlib import Path

import pytest
import trio

from invariantd.client.demo import SRC_PROFILE
from invariantd.daemon.config import PeerEntry
from invariantd.daemon.rpcclient import Client
from invariantd.daemon.server import make_backend, run
from support.cluster import call, cfg

EXAMPLE = Path(__file__).resolve().parents[2] / "client" / "examples" / "list_vms.c++"
pytestmark = pytest.mark.skipif(not (shutil.which("capnp") and shutil.which("c++")
                                     and Path("/usr/include/capnp/ez-rpc.h").exists()),
                                reason="needs capnproto, libcapnp-dev and a C++ compiler (the README's test command "
                                       "installs them)")


def build(out: Path) -> Path:
    schemas = resources.files("invariantd.protocol").joinpath("schemas")
    with resources.as_file(schemas) as d:
        subprocess.run(["capnp", "compile", f"-oc++:{out}", f"--src-prefix={d}", str(d / "rpc.capnp"),
                        str(d / "invariantd.capnp")], check=True)
    exe = out / "list_vms"
    subprocess.run(["c++", "-std=c++17", f"-I{out}", str(EXAMPLE), str(out / "rpc.capnp.c++"),
                    str(out / "invariantd.capnp.c++"), "-lcapnp-rpc", "-lcapnp", "-lkj-async", "-lkj", "-o",
                    str(exe)], check=True)
    return exe


async def test_a_cpp_orchestrator_lists_vms_and_peers(nursery, pki, tmp_path):
    exe = await trio.to_thread.run_sync(build, tmp_path)
    sock = tmp_path / "rpc.sock"
    c = cfg("node-a", pki, SRC_PROFILE, (PeerEntry("node-b", "127.0.0.1", 7, server_name="localhost"),),
            rpc_tls=False, unix=str(sock))
    await nursery.start(partial(run, c, backend=make_backend(c)))
    with Client(f"unix:{sock}") as py:
        await call(py.create_vm, "vm-c", 2)
    out = await trio.to_thread.run_sync(
        lambda: subprocess.run([str(exe), f"unix:{sock}"], capture_output=True, text=True, timeout=30))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "vm vm-c running 2 vCPUs aarch64" in lines and "node node-a" in lines
    assert "peer node-b 127.0.0.1:7" in lines
