"""The real entry point on bad input: one line naming the culprit, exit 2, nothing written."""

from __future__ import annotations

import pytest

from conftest import run_mow


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# The bad-input corpus (38 cases, in-process) is tests/faults/test_bad_input.py; this one case
# proves the installed entry point itself: a real process, exit code 2, one stderr line.
@pytest.mark.parametrize("args, named", [
    (["train", "--game", "Pongg", "--seed", "1"], "Pongg"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(project, args, named):
    before = _listing(project)
    res = run_mow(args, cwd=project, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mow: error:") and named in lines[0], res.stderr
    assert _listing(project) == before


def test_corrupt_model_file_is_reported_by_path(project):
    bad = project / "model.ckpt"
    bad.write_bytes(b"MOWCKPT1" + b"\0" * 40)
    res = run_mow(["evaluate", "--model", str(bad), "--out", str(project / "out.json")], cwd=project, timeout=120)
    assert res.returncode == 2 and "model.ckpt" in res.stderr and "checksum" in res.stderr
    assert not (project / "out.json").exists()


def test_params_prints_the_storm_sizes(project):
    res = run_mow(["params", "--json", "params.json"], cwd=project, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "STORM x26 (minimal)" in res.stdout and "1977.5" in res.stdout
    import json

    table = json.loads((project / "params.json").read_text())
    one, many = table["totals"]["STORM x1 (18 act.)"], table["totals"]["STORM x26 (minimal)"]
    assert abs(one / 19.94e6 - 1) < 0.005 and abs(many / 518.19e6 - 1) < 0.005
    assert abs(table["totals_mib_fp32"]["STORM x26 (minimal)"] / 1977.5 - 1) < 0.005
