"""The benchmark tables in docs/ are the ones bench/render_tables.py renders from bench/results/*.json."""

import shutil
from pathlib import Path

import pytest

from tests.bench_scripts import bench_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def render():
    with bench_script("render_tables") as module:
        yield module


def test_docs_tables_match_the_bench_results(render):
    stale = render.stale_tables()
    assert not stale, ("docs tables differ from bench/results; run .venv/bin/python bench/render_tables.py:\n"
                       + "\n".join(stale))


def test_the_docs_mark_their_benchmark_tables(render):
    shown = {m.group(2) for page in (ROOT / "docs").glob("*.md") for m in render._BLOCK.finditer(page.read_text())}
    assert {"reference_backend", "vllm_backend", "codebook_models", "sae_objectives", "sae_training",
            "default_sae_quality", "topic_steering", "topic_steering_fluency", "polysemanticity"} <= shown


@pytest.fixture
def docs(tmp_path):
    out = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", out)
    return out


def test_check_names_the_stale_table_and_a_rewrite_fixes_only_tables(render, docs, capsys):
    page = docs / "benchmarks.md"
    text = page.read_text()
    assert "| 1 | 28.3 |" in text and "Runs vary by a few percent" in text
    page.write_text(text.replace("| 1 | 28.3 |", "| 1 | 99.9 |").replace("Runs vary by a few percent",
                                                                             "Runs vary by a lot"))
    assert render.main(["--check", "--docs", str(docs)]) == 1
    out = capsys.readouterr().out
    assert "benchmarks.md: table reference_backend (from bench/results/reference_backend.json)" in out
    assert "vllm_backend" not in out  # only the table that changed

    assert render.main(["--docs", str(docs)]) == 0
    fixed = page.read_text()
    assert "| 1 | 28.3 |" in fixed and "Runs vary by a lot" in fixed  # the table regenerated, the prose kept
    assert render.main(["--check", "--docs", str(docs)]) == 0


def test_prose_outside_markers_is_never_checked(render, docs):
    page = docs / "training.md"
    page.write_text(page.read_text() + "\n| a hand-made table | 1 |\n| --- | ---: |\n| x | 2 |\n")
    assert render.stale_tables(docs) == []


def test_indented_tables_keep_their_indentation(render):
    text = "- item:\n\n  <!-- table:sae_training -->\n  | old |\n  <!-- /table -->\n"
    new, names = render.render_page(text)
    assert names == ["sae_training"]
    body = new.split("<!-- table:sae_training -->\n")[1].split("<!-- /table -->")[0]
    assert all(line.startswith("  ") for line in body.splitlines() if line)
    assert "  | Rudder local |" in body


@pytest.mark.parametrize("text,fragment", [
    ("<!-- table:no_such_bench -->\n| x |\n<!-- /table -->\n", "unknown table 'no_such_bench'"),
    ("<!-- table:sae_training -->\n| x |\n", "has no `<!-- /table -->`"),
])
def test_bad_markers_stop_the_script(render, text, fragment):
    with pytest.raises(SystemExit, match=fragment):
        render.render_page(text)


def test_a_table_registered_twice_raises(render):
    with pytest.raises(ValueError, match="registered twice"):
        render.table("sae_training", "sae_training.json", "lr")(lambda d: [])
