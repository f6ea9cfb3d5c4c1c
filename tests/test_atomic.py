"""covidseg.io.atomic's CSV writer: the same bytes as the csv module's writers, written atomically."""

from __future__ import annotations

import csv
import io

import pytest

from covidseg.io.atomic import csv_text, write_csv

COLUMNS = ["case_id", "dice", "note"]
#: cells that need quoting (comma, quote, newline), a float (written as repr), an int, None, non-ASCII
AWKWARD = [
    {"case_id": "a,b", "dice": 0.1 + 0.2, "note": 'say "hi"'},
    {"case_id": "line\nbreak", "dice": 3, "note": None},
    {"case_id": "Zürich", "dice": ""},  # "note" missing: an empty cell
]


def _dict_writer_text(rows) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def test_mapping_rows_are_written_as_csv_dictwriter_writes_them():
    text = csv_text(COLUMNS, AWKWARD)
    assert text == _dict_writer_text(AWKWARD)
    assert text.splitlines()[0] == "case_id,dice,note" and text.endswith("\n") and "\r" not in text
    assert list(csv.DictReader(io.StringIO(text)))[0] == {"case_id": "a,b", "dice": "0.30000000000000004",
                                                         "note": 'say "hi"'}  # fmt: skip


def test_sequence_rows_are_written_in_column_order():
    rows = [[row.get(c, "") for c in COLUMNS] for row in AWKWARD]
    assert csv_text(COLUMNS, rows) == _dict_writer_text(AWKWARD)
    assert csv_text(COLUMNS, iter(rows)) == csv_text(COLUMNS, rows)  # a generator is read once
    assert csv_text(("n",), []) == "n\n"  # no rows: the header alone


def test_a_field_that_is_not_a_column_is_refused():
    with pytest.raises(ValueError, match="'extra'"):
        csv_text(COLUMNS, [{"case_id": "a", "extra": 1}])


def test_write_csv_writes_the_text_atomically(tmp_path):
    path = tmp_path / "sub" / "table.csv"
    write_csv(path, COLUMNS, AWKWARD)
    assert path.read_bytes() == csv_text(COLUMNS, AWKWARD).encode("utf-8")
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.csv"]  # no temporary file left
    with pytest.raises(ValueError):  # a bad row leaves the previous file as it was
        write_csv(path, COLUMNS, [{"case_id": "b"}, {"bad": 1}])
    assert path.read_bytes() == csv_text(COLUMNS, AWKWARD).encode("utf-8")
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.csv"]
