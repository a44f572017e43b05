"""BENCHMARKS.md opens with the table `bench/figures.py` draws from bench/results/: every
measure read from its latest result, and the page never behind the results it shows."""

from bench.figures import LOG, MEASURES, ROOT, TOP, rows


def test_the_table_of_current_figures_is_drawn_from_the_latest_results():
    text = (ROOT / "BENCHMARKS.md").read_text()
    table = text.split(TOP + "\n", 1)[1].split(LOG + "\n", 1)[0].strip().splitlines()
    assert table == rows(), "BENCHMARKS.md is behind bench/results/: run python bench/figures.py"
    assert all("not measured |" not in row for row in table[2 : 2 + len(MEASURES)])


def test_the_demo_report_gives_a_paired_t_interval_over_the_seeds():
    from bench.bench_demo import difference_row, interval

    # t(0.975, 2 degrees of freedom) = 4.303: the interval of 1, 2, 3 is 2 -/+ 4.303 / sqrt(3)
    mean, low, high = interval([1.0, 2.0, 3.0])
    assert mean == 2 and abs(high - 2 - 4.303 / 3**0.5) < 1e-3 and low == 2 * mean - high
    assert (
        difference_row("d", [1.0, 2.0, 3.0])
        == "| d | 3 | **+2.00** | -0.48 to +4.48 | +1.0 | +1.0, +2.0, +3.0 |"
    )


def test_the_fold_report_scores_every_digit_but_the_demos_labeled_ones_once():
    import numpy as np
    from sklearn.datasets import load_digits

    from bench.bench_demo_folds import fold_splits, pooled
    from rs_pseudolabel.data.digits import split_digits

    targets = load_digits().target
    train, held = fold_splits(100, 50, 5)
    assert np.array_equal(train, split_digits(50, 100)["labeled"])  # the demo's teacher's
    scored = np.concatenate(held)
    assert len(scored) == len(set(scored)) == len(targets) - 50
    assert not set(scored) & set(train)
    assert {len(fold) for fold in held} <= {349, 350}
    per_class = np.array([np.bincount(targets[fold], minlength=10) for fold in held])
    assert (per_class.max(axis=0) - per_class.min(axis=0)).max() <= 1  # stratified
    # pooled over the folds' digits, not a mean of the folds' shares
    record = {"folds": [{"t": {"top1": 0.5, "samples": 100}}, {"t": {"top1": 1.0, "samples": 300}}]}
    assert pooled(record, "t") == 87.5
