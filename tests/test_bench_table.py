"""BENCHMARKS.md opens with the table `bench/figures.py` draws from bench/results/: every
measure read from its latest result, and the page never behind the results it shows."""

from bench.figures import LOG, MEASURES, ROOT, TOP, rows


def test_the_table_of_current_figures_is_drawn_from_the_latest_results():
    text = (ROOT / "BENCHMARKS.md").read_text()
    table = text.split(TOP + "\n", 1)[1].split(LOG + "\n", 1)[0].strip().splitlines()
    assert table == rows(), "BENCHMARKS.md is behind bench/results/: run python bench/figures.py"
    assert all("not measured |" not in row for row in table[2 : 2 + len(MEASURES)])
