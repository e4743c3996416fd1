"""The rows every experiment writes: the demo's and TA8's schema unchanged, and the protocols' optional parts
(test split, seen/unseen averages, parameters and saved size) only where a row has them."""

from __future__ import annotations

import pytest

from hf_wemoe.errors import WEMoEError
from hf_wemoe.workflows.experiment import ExperimentOptions, MergeSpec, ResultRow, results_markdown
from hf_wemoe.workflows.protocols import check_sparsities, robustness_table, sparsity_label, sparsity_table
from hf_wemoe.workflows.suites import (
    ROBUSTNESS_TASKS,
    check_condition,
    robustness_suite,
    ta8_suite,
    with_unseen,
)

TASKS = ["a", "b", "c"]
BASE_KEYS = {"method", "adaptation", "routing", "stream", *TASKS, "average", "seconds", "collapsed"}


def test_a_plain_row_keeps_the_demo_schema_and_table():
    row = ResultRow("wemoe", "sample", {"a": 90.0, "b": 80.0, "c": 70.0}, "entropy, 2 steps", seconds=3.0)
    assert set(row.to_dict()) == BASE_KEYS
    table = results_markdown([row], TASKS)
    assert table.splitlines()[0] == "| method | adaptation | routing | stream | a | b | c | average | adaptation time |"
    assert table.splitlines()[2] == "| wemoe | entropy, 2 steps | sample | per task | 90.0 | 80.0 | 70.0 | 80.0 | 3 s |"


def test_unseen_tasks_get_their_own_averages_and_columns():
    accuracy = {"a": 90.0, "b": 80.0, "c": 40.0}
    row = ResultRow("wemoe", "sample", accuracy, "entropy, 2 steps", unseen=["c"])
    experts = ResultRow("individual experts", None, {"a": 95.0, "b": 85.0}, unseen=["c"])
    data = row.to_dict()
    assert set(data) == BASE_KEYS | {"seen_average", "unseen_average"}
    assert (data["seen_average"], data["unseen_average"], data["average"]) == (85.0, 40.0, 70.0)
    assert experts.unseen_average is None and experts.to_dict()["unseen_average"] is None
    lines = results_markdown([row, experts], TASKS).splitlines()
    assert lines[0].startswith("| method | adaptation | routing | stream | a | b | c (unseen) | average | seen average "
                               "| unseen average | adaptation time |")  # fmt: skip
    assert lines[3].split(" | ")[-4:] == ["90.0", "90.0", "–", "– |"]  # the experts have no unseen task


def test_split_and_size_columns_appear_only_when_set():
    row = ResultRow("e-wemoe", "sample", {"a": 50.0}, "x", split="impulse_noise", parameters=1_234_567,
                    saved_bytes=2_500_000, collapsed=["a"])  # fmt: skip
    data = row.to_dict()
    assert data["split"] == "impulse_noise" and (data["parameters"], data["saved_bytes"]) == (1_234_567, 2_500_000)
    lines = results_markdown([row], ["a"]).splitlines()
    assert lines[0] == ("| method | adaptation | routing | stream | test split | a | average | parameters | "
                        "saved size | adaptation time |")  # fmt: skip
    assert lines[1] == "|---|---|---|---|---|---:|---:|---:|---:|---:|"
    assert lines[2] == "| e-wemoe | x | sample | per task | impulse_noise | 50.0! | 50.0 | 1.23 M | 2.50 MB | – |"


def test_merge_specs_name_their_rows_and_must_be_distinct():
    options = ExperimentOptions(methods=["pretrained", "wemoe", MergeSpec("e-wemoe", {"sparsity": 0.5}, "e50"), "oracle"])
    assert [(s.method, s.name) for s in options.merge_specs()] == [("wemoe", "wemoe"), ("e-wemoe", "e50")]
    with pytest.raises(WEMoEError, match="two merges are named"):
        ExperimentOptions(methods=["wemoe", MergeSpec("wemoe")]).merge_specs()
    with pytest.raises(WEMoEError, match="unknown merge method 'magic'"):
        ExperimentOptions(methods=["magic"]).merge_specs()


def test_sparsities_must_lie_in_the_unit_interval():
    assert check_sparsities([0, 0.5, 0.99]) == [0.0, 0.5, 0.99]
    for bad, message in (([1.0], r"in \[0, 1\)"), ([-0.1], r"in \[0, 1\)"), ([], "no sparsity"), ([0.5, 0.5], "twice")):
        with pytest.raises(WEMoEError, match=message):
            check_sparsities(bad)


def test_sparsity_summary_compares_with_dense_wemoe_and_the_reported_numbers():
    rows = [
        ResultRow("task-arithmetic", None, {"a": 60.0}, parameters=100, saved_bytes=400),
        ResultRow("wemoe", "sample", {"a": 90.0}, "entropy, 2 steps", parameters=1000, saved_bytes=4000),
        ResultRow(sparsity_label(0.9), "sample", {"a": 88.0}, "entropy, 2 steps", parameters=300, saved_bytes=1000),
    ]
    lines = sparsity_table(rows, [0.9], {0.9: 89.2}).splitlines()
    assert lines[2] == "| e-wemoe (sparsity 0.9) | 0.9 | entropy, 2 steps | 88.0 | – | 300 | 1.00 kB | 0.25× | 89.2 |"
    assert lines[4].startswith("| wemoe | 0 (dense) |") and lines[4].endswith("| 1.00× | – |")


def test_robustness_summary_names_the_lowest_and_collapsed_tasks():
    rows = [
        ResultRow("wemoe", "sample", {"a": 90.0, "b": 10.0}, "entropy", split="gaussian_noise", collapsed=["b"]),
        ResultRow("wemoe", "sample", {"a": 90.0, "b": 80.0}, "entropy", split="clean"),
    ]
    lines = robustness_table(rows, ["clean", "gaussian_noise"], {"wemoe": {"clean": 92.4}}).splitlines()
    assert lines[2] == "| wemoe | entropy | 85.0 (min b 80.0) | 50.0 (min b 10.0, collapsed: b!) |"
    assert lines[3] == "| wemoe, reported | – | 92.4 | – |"


def test_suites_of_the_protocols():
    split1 = with_unseen(ta8_suite("base-patch32"), ["mnist", "eurosat"])
    assert split1.unseen == ["eurosat", "mnist"] and len(split1.seen) == 6  # in the suite's task order
    assert all(task.expert is None for task in split1.tasks if task.name in ("mnist", "eurosat"))
    with pytest.raises(WEMoEError, match=r"unknown task\(s\) \['cifar10'\] in the unseen split"):
        with_unseen(ta8_suite("base-patch32"), ["cifar10"])
    with pytest.raises(WEMoEError, match="every task is unseen"):
        with_unseen(ta8_suite("base-patch32", ["mnist"]), ["mnist"])
    noisy = robustness_suite("base-patch16", "impulse_noise")
    assert noisy.task_names == list(ROBUSTNESS_TASKS)
    assert [task.dataset for task in noisy.tasks] == [
        "tanganke/stanford_cars#impulse_noise", "tanganke/eurosat#impulse_noise", "tanganke/resisc45#impulse_noise",
        "tanganke/gtsrb#impulse_noise",
    ]  # fmt: skip
    assert robustness_suite("base-patch32", "clean").tasks[1].dataset == "tanganke/eurosat#test"
    with pytest.raises(WEMoEError, match="unknown corruption 'fog'"):
        check_condition("fog")
    with pytest.raises(WEMoEError, match="corrupted splits"):
        robustness_suite("base-patch32", "clean", ["mnist"])
