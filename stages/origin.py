"""Where a fetched row came from, so a later stage's error names the file and line (or row).

fetch_data writes `origin.arrow` next to `data.arrow`, one entry per row: the file's label (as
in the key: relative to the dataset's path, the same on every machine), its 1-based `line` in a
line-based file (JSON Lines, text; null elsewhere) and its 1-based `row` within that file. The
format stage copies it into its artifact, so tokenize can name the same place. A stage reads it
only to word an error; without one (a table written by a test) the row is named 1-based.
"""

from __future__ import annotations

from pathlib import Path

FILE = "origin.arrow"


def table(files: list[str], lines: list[int | None], rows: list[int]):
    import pyarrow as pa

    # file names repeat: dictionary-encoded, the table costs about 12 bytes a row
    return pa.table({"file": pa.array(files, type=pa.string()).dictionary_encode(), "line": pa.array(lines, type=pa.int32()),
                     "row": pa.array(rows, type=pa.int32())})


def where(artifact: Path | None, row: int) -> str:
    """`data.jsonl line 7` or `data.parquet row 7` for row `row` (0-based) of a fetched table;
    `row 7` when the artifact has no origin."""
    path = Path(artifact) / FILE if artifact is not None else None
    if path is not None and path.is_file():
        from stages.store import read_table

        entry = read_table(path).slice(row, 1).to_pylist()
        if entry:
            e = entry[0]
            return f"{e['file']} line {e['line']}" if e["line"] is not None else f"{e['file']} row {e['row']}"
    return f"row {row + 1}"
