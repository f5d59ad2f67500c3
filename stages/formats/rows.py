"""Row checks shared by prompt strategies; a RowError names the field, the format stage adds
the dataset and row number."""

from __future__ import annotations


class RowError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}")
        self.field = field


def require_text(row: dict, field: str) -> str:
    if field not in row or row[field] is None:
        raise RowError(field, "missing")
    value = row[field]
    if not isinstance(value, str):
        raise RowError(field, f"expected text, got {type(value).__name__}")
    return value
