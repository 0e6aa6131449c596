"""`snakemake --report report.html`: every table and figure of the report rule, captioned.

No pipeline run: the report rule's outputs are fabricated in a copy of the workflow (a
report only needs the files to exist; Snakemake warns about the missing job metadata).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from mow.results import FIGURES, SUMMARIES, TABLES, outputs

from conftest import REPO

CAPTIONS = REPO / "workflow" / "report"


def test_every_report_output_has_a_caption_file():
    names = {p.name for p in CAPTIONS.glob("*.rst")}
    assert {f"{name}.rst" for name in FIGURES} | {"tables.rst", "summaries.rst", "report.rst", "workflow.rst"} <= names
    for path in CAPTIONS.glob("*.rst"):
        assert len(path.read_text().split()) >= 10, path  # a sentence, not a placeholder


def test_snakemake_report_has_captioned_figures_and_tables(tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    shutil.copy(REPO / "Snakefile", work)
    shutil.copy(REPO / "params.yaml", work)
    shutil.copytree(REPO / "workflow", work / "workflow")
    for path in outputs(work / "results"):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".png":
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        else:
            path.write_text('{"scale": "smoke"}\n' if path.suffix == ".json" else "a,b\n1,2\n")
    res = subprocess.run([sys.executable, "-m", "snakemake", "--report", "report.html", "results/REPORT.md"],
                         cwd=work, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "Report created" in res.stderr + res.stdout, res.stderr[-3000:]
    html = (work / "report.html").read_text()
    for name in (*TABLES, *SUMMARIES, *FIGURES, "REPORT.md"):
        assert name in html, name
    for category in ('"Figures"', '"Tables"', '"Report"'):
        assert category in html, category
    # captions: the workflow description and one per kind of output
    assert "MoW / STORM reproduction at the scale" in html
    assert "harmonious loss weighting" in html  # sigma.png
    assert "Machine-readable summaries for DVC" in html and "every number the paper reports" in html
    assert not Path(work / "runs").exists()  # nothing ran
