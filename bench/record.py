"""Benchmark bookkeeping: time whole processes, read their peak memory, append to BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench.figures import write_table

ROOT = Path(__file__).resolve().parent.parent
_PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
)


def timed(cmd: list[str], cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak resident memory (KiB) of one whole process; `cwd`: a checkout
    whose code `python -m` runs instead of this one's."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True, cwd=cwd
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return seconds, int(result.stderr.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def append(title: str, command: str, lines: list[str], name: str, figures: dict) -> None:
    """Add a dated section to BENCHMARKS.md: what was measured, where, and how to redo it;
    and keep the figures as bench/results/NAME.json, where the cost table reads them."""
    block = [
        f"### {title} ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}. Command: `{command}`",
        "",
        *lines,
        "",
    ]
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    path.write_text(text.rstrip("\n") + "\n\n" + "\n".join(block))
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": command}
    (results / f"{name}.json").write_text(json.dumps(record | figures, indent=1) + "\n")
    write_table(path)
    print("\n".join(block))
