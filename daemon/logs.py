"""Logging an operator can use: journald priorities and key=value fields.

Under systemd (stderr is the journal: $JOURNAL_STREAM) each line starts with its sd-daemon priority <N>, so
`journalctl -p err` shows errors. Lines about a migration or a VM carry their identifiers as key=value fields
right after a short event phrase, the reason last:

    migration aborted migration=3f2a... vm=web-1 peer=node-b: peer did not answer in time

so `journalctl -u invariantd | grep migration=3f2a` follows one migration across both daemons. kv() makes the
fields (a value with spaces or quotes is quoted, an empty one is "-").
"""
from __future__ import annotations

import logging
import os


def kv(**fields) -> str:
    out = []
    for k, v in fields.items():
        v = "-" if v is None or v == "" else str(v)
        if any(c in v for c in " \"=\n"):
            v = '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
        out.append(f"{k}={v}")
    return " ".join(out)


class JournalFormatter(logging.Formatter):
    """Under systemd (stderr is the journal: $JOURNAL_STREAM), each line starts with its sd-daemon priority <N>,
    so `journalctl -p err` shows errors; elsewhere the level name."""
    PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

    def __init__(self, journal: bool) -> None:
        super().__init__("%(name)s: %(message)s" if journal else "%(levelname)s %(name)s: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journal:
            return text
        prio = self.PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return "\n".join(f"<{prio}>{ln}" for ln in text.splitlines())


def setup_logging(level: str) -> None:
    h = logging.StreamHandler()
    h.setFormatter(JournalFormatter(bool(os.environ.get("JOURNAL_STREAM"))))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[h])
