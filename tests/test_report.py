"""The before/after table that training and `dtune eval` print: one definition of "change"."""

from __future__ import annotations

from dtune.report import comparison_table, format_metrics


def test_change_is_points_for_accuracy_and_difference_with_relative_size_otherwise():
    table = comparison_table([("held-out", {"eval/loss": 2.0, "eval/accuracy": 0.5}, {"eval/loss": 1.5, "eval/accuracy": 0.75})])
    lines = table.splitlines()
    assert lines[0].split() == ["set", "metric", "before", "after", "change"]
    assert lines[1].split() == ["held-out", "eval/loss", "2", "1.5", "-0.5", "(-25.0%)"]
    assert lines[2].split() == ["held-out", "eval/accuracy", "50.0%", "75.0%", "+25.0", "pts"]


def test_rows_per_set_and_named_columns():
    table = comparison_table(
        [("task", {"eval/loss": 1.0}, {"eval/loss": 1.1}), ("general", {"eval/loss": 3.0}, {})], ("base", "adapter")
    )
    assert table.splitlines()[0].split()[2:4] == ["base", "adapter"]
    assert len(table.splitlines()) == 2  # a metric missing after is left out, not shown as zero
    assert "(+10.0%)" in table


def test_one_line_metrics():
    assert format_metrics({"eval/loss": 1.23456, "eval/accuracy": 0.8125}) == "loss 1.2346  accuracy 81.25%"
