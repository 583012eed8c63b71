from __future__ import annotations

import json

import pytest

from rtfq_deploy.accuracy import read_accuracy
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
