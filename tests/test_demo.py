"""``medlens demo`` in its lightest mode: the default method set on a few small phantoms, each map
computed once, tables sorted by energy pointing game with the best value of each column marked."""

from __future__ import annotations

import csv
import re

import pytest
from typer.testing import CliRunner

from medlens.cli import app
from medlens.workflows.demo import (DEFAULT_METHODS, HIGHER_IS_BETTER, DemoConfig, best_per_column, results_markdown,
                                    run_demo, sort_rows)

N, TEST = 40, 8  # a fifth held out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--n", str(N), "--size", "32", "--epochs", "1"],
                                terminal_width=160)
    assert result.exit_code == 0, result.output
    return out, result.output


def _float(text: str) -> float:
    return float(text.strip().strip("*").replace("\\", ""))


def test_default_set_each_map_once_and_sorted_tables(demo):
    out, output = demo
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["method"] for r in rows) == sorted(DEFAULT_METHODS)
    epg = [float(r["energy_pointing_game"]) for r in rows]
    assert epg == sorted(epg, reverse=True)
    # every map once: the held-out maps, the sanity maps of the one randomised model (8 images, all held out
    # here), and the other class of the per-class panel; nothing else (no probing, no cascade of explains)
    assert f"{len(DEFAULT_METHODS)} methods, {len(DEFAULT_METHODS) * (TEST + TEST) + 1:,} maps computed" in output
    terminal = [line for line in output.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in terminal] == [r["method"] for r in rows]  # same order on screen
    assert sum(line.count("*") for line in terminal) >= 3


def test_best_value_of_each_column_is_marked(demo):
    out, _ = demo
    with open(out / "results.csv", newline="") as handle:
        rows = [{k: (v if k in ("method", "sanity") else float(v)) for k, v in r.items()} for r in csv.DictReader(handle)]
    best = best_per_column(rows)
    assert set(best) <= set(HIGHER_IS_BETTER) and "energy_pointing_game" in best
    for column, value in best.items():
        values = [r[column] for r in rows]
        wanted = min(values, key=abs) if column == "sanity_spearman" else (max(values) if HIGHER_IS_BETTER[column] else min(values))
        assert value == wanted, column
    table = (out / "results.md").read_text().splitlines()
    header = [c.strip().split(" ")[0] for c in table[0].strip("|").split("|")]
    for line, row in zip(table[2:], rows):
        cells = line.strip("|").split("|")
        assert cells[0].strip() == row["method"]
        for column, cell in zip(header, cells):
            marked = cell.strip().startswith("**")
            assert marked == (column in best and f"{row[column]:.3g}" == f"{best[column]:.3g}"), (column, cell)
    page = (out / "report.html").read_text()
    starred = re.findall(r'<td class="num best"><b>([^<]+)\*</b></td>', page)
    assert len(starred) >= len(best)
    assert page.index(f"<td>{rows[0]['method']}</td>") < page.index(f"<td>{rows[-1]['method']}</td>")
    assert "maps computed, each once" in page


def test_markdown_and_sorting_helpers_on_known_rows():
    rows = [{"method": m, "pointing_game": pg, "energy_pointing_game": e, "auroc": 0.5, "deletion_auc": d,
             "insertion_auc": 0.5, "sanity_spearman": s, "sanity": "passes", "ms_per_image": t}
            for m, pg, e, d, s, t in (("a", 0.2, 0.1, 0.4, -0.6, 5.0), ("b", 0.9, 0.3, 0.5, 0.1, 9.0), ("c", 0.5, 0.3, 0.2, 0.4, 1.0))]
    assert [r["method"] for r in sort_rows(rows)] == ["b", "c", "a"]  # ties broken by name
    best = best_per_column(rows)
    assert best == {"pointing_game": 0.9, "energy_pointing_game": 0.3, "deletion_auc": 0.2, "sanity_spearman": 0.1,
                    "ms_per_image": 1.0}  # auroc and insertion: all equal, nothing to mark
    table = results_markdown(sort_rows(rows)).split("\n\n")[0]
    assert table.count("**") == 2 * 6  # b: pg, epg, rho; c: epg, del, ms


def test_full_and_method_are_exclusive_and_unknown_methods_are_named(tmp_path):
    both = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "x"), "--full", "-m", "gradcam"])
    assert both.exit_code == 2 and "--full" in both.output
    from medlens.errors import MedlensError

    with pytest.raises(MedlensError, match="'nope' is not a registered method"):
        run_demo(tmp_path / "y", DemoConfig(n=20, size=32, epochs=1, methods=["nope"]), progress=False)
