"""Progress bars: redrawn in place in a terminal, a few plain lines in a log."""

import io

from rs_pseudolabel.data.progress import LOG_INTERVAL_S, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_bar(stream: io.StringIO, steps: int, seconds_per_step: float) -> str:
    """A bar over `steps` updates on a clock the test moves (tqdm reads it through `_time`),
    on the first line whatever bars other tests left open."""
    now = [0.0]
    bar = progress_bar(total=steps, desc="stage", file=stream, position=0)
    bar._time = lambda: now[0]
    bar.start_t = bar.last_print_t = 0.0
    for step in range(steps):
        now[0] = (step + 1) * seconds_per_step
        bar.update()
    bar.close()
    return stream.getvalue()


def test_a_log_gets_a_line_every_few_seconds_not_every_step():
    steps, seconds_per_step = 2000, 0.05  # 100 s of work
    text = _run_bar(io.StringIO(), steps, seconds_per_step)
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    expected = steps * seconds_per_step / LOG_INTERVAL_S
    assert expected <= len(lines) <= expected + 3, lines  # plus the first and the last
    assert lines[0].startswith("stage:") and f"{steps}/{steps}" in lines[-1]


def test_a_terminal_redraws_in_place():
    text = _run_bar(_Terminal(), 2000, 0.05)
    assert text.count("\r") > 100 and text.count("\n") <= 1
