"""invariantd.protocol: pure data and logic, no I/O.

Nothing in this package may import trio, socket, cffi or open files other than its
own bundled data (a test enforces it). Register knowledge lives in data/ as tables.
"""


def version() -> str:
    """The installed invariantd's version (pyproject.toml's, the one owner), or "unknown" from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version as _version
    try:
        return _version("invariantd")
    except PackageNotFoundError:
        return "unknown"
