"""protocol/ stays free of I/O: no trio, socket, cffi, subprocess or asyncio imports."""
import ast
from pathlib import Path

FORBIDDEN = {"trio", "socket", "cffi", "subprocess", "asyncio", "ssl", "select", "selectors"}


def test_protocol_imports_no_io_modules():
    root = Path(__file__).resolve().parents[2] / "protocol"
    bad = []
    files = list(root.rglob("*.py"))
    assert len(files) > 10, root            # the folder was found (the test cannot pass vacuously)
    for py in files:
        for node in ast.walk(ast.parse(py.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            bad += [f"{py.relative_to(root)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not bad, bad
