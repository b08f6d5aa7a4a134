"""Debian's real etcd server on loopback, for the publishing and fleet tests and the fleet bench."""
from __future__ import annotations

import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def etcd_server(data: Path):
    """Start `etcd` with its data under `data`; yields ("127.0.0.1:PORT", an etcd3gw client). Stopped on exit."""
    import etcd3gw
    data.mkdir(parents=True, exist_ok=True)
    client, peer = free_port(), free_port()
    with open(data / "log", "w") as log:
        proc = subprocess.Popen(["etcd", "--data-dir", str(data / "data"), "--name", "t",
                                 "--listen-client-urls", f"http://127.0.0.1:{client}",
                                 "--advertise-client-urls", f"http://127.0.0.1:{client}",
                                 "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                                 "--initial-cluster", f"t=http://127.0.0.1:{peer}",
                                 "--quota-backend-bytes", str(1 << 31)],
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        c = etcd3gw.client(host="127.0.0.1", port=client)
        for _ in range(200):
            try:
                c.status()
                break
            except Exception:                # noqa: BLE001 - not listening yet
                if proc.poll() is not None:
                    raise RuntimeError(f"etcd exited: {(data / 'log').read_text()[-2000:]}") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{client}", c
    finally:
        proc.terminate()
        proc.wait(10)
