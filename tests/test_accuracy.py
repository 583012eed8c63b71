from __future__ import annotations

import json

import pytest

from rtfq_deploy.accuracy import read_accuracy, read_accuracy_table, write_accuracy_table
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.export import select


def test_export_select_reexports_the_torch_free_reader():
    assert select.read_accuracy is read_accuracy


@pytest.mark.parametrize("text,needle", [
    ('{"subnets": [{"subnet": "r64-w1.00-q4", "top1": NaN}]}', "not a finite number"),
    ('{"r64-w1.00-q4": Infinity}', "not a finite number"),
    ('{"subnets": []}', "empty"),
    ('[{"subnet": "a", "top1": "high"}]', "not an accuracy table"),
])
def test_unusable_tables_are_refused(tmp_path, text, needle):
    (tmp_path / "acc.json").write_text(text)
    with pytest.raises(RtfqError, match=needle):
        read_accuracy(tmp_path / "acc.json")


def test_rows_may_say_accuracy_instead_of_top1(tmp_path):
    (tmp_path / "acc.json").write_text(json.dumps([{"subnet": "r64-w1.00-q4", "accuracy": 0.75}]))
    assert read_accuracy(tmp_path / "acc.json") == {"r64-w1.00-q4": 0.75}


def test_the_written_table_reads_back_and_keeps_its_layout(tmp_path):
    rows = [{"subnet": "r64-w1.00-q4", "top1": 0.5, "macs": 7}, {"subnet": "r64-w1.00-q8", "top1": 0.75, "macs": 9}]
    path, sha = tmp_path / "acc.json", "ab" * 32
    write_accuracy_table(path, rows, tmp_path / "s.pt", sha, tmp_path / "data")
    assert path.read_text() == json.dumps({"format": "rtfq-accuracy", "version": 1, "checkpoint": str(tmp_path / "s.pt"),
                                           "checkpoint_sha256": sha, "data": str(tmp_path / "data"),
                                           "subnets": rows}, indent=2) + "\n"
    table = read_accuracy_table(path)
    assert table.top1 == {"r64-w1.00-q4": 0.5, "r64-w1.00-q8": 0.75} and table.checkpoint_sha256 == sha
    with pytest.raises(FileExistsError):
        write_accuracy_table(path, rows[:1], tmp_path / "s.pt", sha, tmp_path / "data")
    write_accuracy_table(path, rows[:1], tmp_path / "s.pt", sha, tmp_path / "data", overwrite=True)
    assert read_accuracy(path) == {"r64-w1.00-q4": 0.5}
