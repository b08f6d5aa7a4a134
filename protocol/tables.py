"""The one reader of the project's TSV tables: kernel facts and rules as data (protocol/data/*.tsv, the simulator's
daemon/sim/eras.tsv). Lines starting with # are the table's documentation; the first other line names the columns."""
from __future__ import annotations

import csv
from importlib import resources


def rows(name: str, package: str = "invariantd.protocol", folder: str = "data") -> list[dict[str, str]]:
    """The rows of `package`/`folder`/`name` as dicts keyed by the header's column names."""
    ref = resources.files(package)
    text = (ref.joinpath(folder, name) if folder else ref.joinpath(name)).read_text()
    return list(csv.DictReader([ln for ln in text.splitlines() if ln and not ln.startswith("#")], delimiter="\t"))
