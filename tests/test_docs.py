"""docs/performance.md, docs/quality.md and README.md's headline table are generated from
perf/results (python -m perf.report_docs); regenerated into a temp folder they must match what is
committed, and the README stays short."""
from __future__ import annotations

from pathlib import Path

from perf import report_docs

ROOT = Path(__file__).resolve().parents[1]


def test_generated_docs_match_perf_results(tmp_path):
    report_docs.main(["--out", str(tmp_path)])
    for rel in ("docs/performance.md", "docs/quality.md", "README.md"):
        fresh = (tmp_path / Path(rel).name).read_text()
        assert fresh == (ROOT / rel).read_text(), f"{rel} is out of date: run `python -m perf.report_docs`"


def test_headline_table_has_five_rows_from_results():
    text = (ROOT / "README.md").read_text()
    block = text.split(report_docs.BEGIN)[1].split(report_docs.END)[0]
    rows = [line for line in block.splitlines() if line.startswith("| ") and "perf/results/" in line]
    assert len(rows) == report_docs.HEADLINE_ROWS
    assert all((ROOT / line.split("](")[1].split(")")[0]).is_file() for line in rows)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_perf_scripts_have_no_path_hacks():
    for path in (ROOT / "perf").rglob("*"):
        if path.suffix in (".py", ".sh"):
            text = path.read_text()
            assert "sys.path.insert" not in text and "../shared" not in text, path
    assert not list((ROOT / "perf").glob("device_*.sh"))


def test_every_transformers_row_is_labelled_as_transformers():
    for doc in report_docs.load(ROOT / "perf" / "results").values():
        for row in doc.get("rows", []) if doc.get("kind", "lcrun.bench") == "lcrun.bench" else []:
            if str(row.get("impl", "")).startswith("transformers"):
                assert report_docs.setup(doc, row).startswith("transformers"), row["impl"]
