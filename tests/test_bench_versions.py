"""`mow bench-versions`: versions of this code timed side by side, each from its own files."""

from __future__ import annotations

import json
import statistics
import subprocess

import pytest

from mow.bench_versions import PARTS, parse_version
from mow.settling import MAX_SETTLE_ROUNDS

from conftest import REPO, run_mow


def test_entry_point_times_each_version_from_its_own_package(tmp_path):
    """The working tree and HEAD (exported by `git archive`) at the smoke scale: each run
    imports the package of its own version, not the installed one, and every part's samples,
    the settling and the memory are in the JSON. Values are not judged."""
    out = tmp_path / "versions.json"
    res = run_mow(["bench-versions", ".", "HEAD", "--scale", "smoke", "--methods", "storm", "--repeats", "2",
                   "--out", str(out)], cwd=REPO / "tests", timeout=600)   # from a subfolder: the repo is found
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["scale"] == "smoke" and result["repeats"] == 2
    work_tree, head = result["runs"]
    assert (work_tree["version"], head["version"]) == (".", "HEAD")
    assert work_tree["package"] == str(REPO / "mow")
    assert head["package"] != work_tree["package"] and head["package"].endswith("/v1/mow")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert head["commit"] == commit and work_tree["commit"].startswith(commit)
    for run in result["runs"]:
        assert run["method"] == "storm" and run["peak_rss_mib"] > 0
        assert 2 <= run["settle_rounds"] <= MAX_SETTLE_ROUNDS
        assert run["settled"] or run["settle_rounds"] == MAX_SETTLE_ROUNDS   # only the cap ends unsettled
        assert all(len(run["samples_s"][part]) == 2 and run[f"{part}_s"] > 0 for part in PARTS)
        assert len(run["page_faults"]) == 2 and min(run["page_faults"]) >= 0
        steps = [sum(run["samples_s"][part][i] for part in PARTS) for i in range(2)]
        assert run["train_step_s"] == pytest.approx(statistics.median(steps), abs=1e-3)
    assert "| one env step's updates |" in res.stdout and "(1.00x)" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["HEAD"], "at least two versions"),
    ([".", "HEAD", "--methods", "dreamer"], "--methods"),
    ([".", "no-such-rev"], "'no-such-rev': not a commit"),
    ([".", "HEAD+train.wm_batch"], "override 'train.wm_batch' is not KEY=VALUE"),
    ([".", "HEAD+model.no_such_key=1"], "version HEAD+model.no_such_key=1 could not build storm"),
])
def test_bad_input_is_one_line_naming_it_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "versions.json"
    methods = [] if "--methods" in args else ["--methods", "storm"]
    res = run_mow(["bench-versions", *args, *methods, "--scale", "smoke", "--repeats", "1", "--out", str(out)],
                  cwd=REPO, timeout=300)
    assert res.returncode == 2
    error = [line for line in res.stderr.splitlines() if line.startswith("mow: error:")]
    assert len(error) == 1 and message in error[0], res.stderr[-2000:]
    assert not out.exists()


def test_parse_version_splits_overrides():
    assert parse_version("021078a+model.mow.expert_layers=1+model.mow.num_clusters=15") == (
        "021078a", ["model.mow.expert_layers=1", "model.mow.num_clusters=15"])
    assert parse_version(".") == (".", [])
    with pytest.raises(ValueError, match="expected REV"):
        parse_version("+a=1")
