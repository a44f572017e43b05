"""`pipeline demo` over the report seeds: what the student gains, and how sure that is.

    python bench/bench_demo.py [--seeds 100 ... 114] [--rounds 2] [--jobs 2] [--keep DIR]

Each seed is a whole `pipeline demo` process in a fresh folder (data split, teacher, label,
filter, student(s), eval). Three controls then train beside it, each the round-1 student's
model, recipe and trainer seed with one thing changed (`bench/controls.py`):

- supervised: the labeled digits alone, at the student's compute (its steps, LR at every
  step and images per step, all drawn from the labeled split);
- noise-free: its pseudo-labels without RandAugment, dropout or stochastic depth;
- oracle: its selection with the true classes that the unlabeled split hides from the
  pipeline (read here, for scoring only): what a perfect teacher would give.

The primary endpoint, declared before the report seeds ran: round-1 student minus the
supervised control, which is what the pseudo-labels bring at equal compute. Every difference
is paired by seed and reported with its per-seed values, mean, 95% confidence interval
(Student's t over the seeds), minimum and n. The report seeds, 100 to 114, play no part in
choosing anything: `bench/select_demo.py` chooses on worlds carved from other seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scipy import stats
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.controls import CONTROLS  # noqa: E402
from bench.fixtures import write_shard  # noqa: E402
from bench.record import ROOT, append, timed  # noqa: E402
from bench.select_demo import REPORT_SEEDS  # noqa: E402
from rs_pseudolabel.data.read import iter_shard  # noqa: E402
from rs_pseudolabel.data.records import PSEUDO_EXT, decode_pseudo, labeled_sample  # noqa: E402

PRIMARY = "round 1 student - supervised control (matched compute)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    report_arguments(parser)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-controls", dest="controls", action="store_false")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-demo-"))
    half = [s for s in args.seeds if (work / f"seed{s}").exists() and not _done(work, s)]
    if half:
        parser.error(
            f"{work}/seed{half[0]} holds a demo this benchmark did not finish: a resumed demo "
            "would not be timed; remove it"
        )
    with ThreadPoolExecutor(args.jobs) as pool:
        reports = list(pool.map(lambda seed: _one_seed(work, seed, args), args.seeds))
    quiet = _quiet_round1(work, args.config)
    if not args.keep:
        shutil.rmtree(work)
    rows, figures = _tables(args, reports)
    figures["round1_quiet_s"] = quiet
    rows.append(
        f"`make demo`'s round 1 (seed 0) alone on the machine, after the seeds: {quiet:.0f} s "
        "of stage time."
    )
    command = f"python bench/bench_demo.py --rounds {args.rounds} --jobs {args.jobs}"
    if args.config:
        command += f" --config {args.config}"
    if args.seeds != list(REPORT_SEEDS):
        command += f" --seeds {' '.join(map(str, args.seeds))}"
    append(
        f"pipeline demo over {len(args.seeds)} report seeds, {args.rounds} round"
        f"{'s' if args.rounds > 1 else ''}, with its controls",
        command,
        rows,
        "demo",
        figures,
    )


def report_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every report over the seeds takes: which seeds, how many at a time,
    where to keep their folders, and the recipe."""
    parser.add_argument("--seeds", type=int, nargs="+", default=list(REPORT_SEEDS))
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at a time (2)")
    parser.add_argument("--keep", help="keep each seed's folder under this directory")
    parser.add_argument("--config", help="demo recipe (default: the bundled configs/demo.yaml)")


def _quiet_round1(work: Path, config: str | None) -> float:
    """Stage seconds of `make demo`'s round 1 (its seed, 0), run afresh with nothing else of
    this benchmark beside it: the seeds above share the cores two at a time."""
    out = work / "quiet-seed0"
    if out.exists():
        shutil.rmtree(out)
    timed(_demo(out, 0, 1, config))
    return _seconds_to_round(json.loads((out / "report.json").read_text()), 1)


def _demo(out: Path, seed: int, rounds: int, config: str | None) -> list[str]:
    """`pipeline demo` of one seed, as `make demo` runs it."""
    command = [sys.executable, "-m", "rs_pseudolabel.pipeline", "demo", "--out", str(out)]
    command += ["--seed", str(seed), "--rounds", str(rounds)]
    return command + (["--config", config] if config else [])


def _done(work: Path, seed: int) -> bool:
    return (work / f"seed{seed}" / "bench.json").exists()


def _one_seed(work: Path, seed: int, args: argparse.Namespace) -> dict:
    """The demo of one seed, the truth of its selections, and its controls; a seed this
    benchmark finished in `work` before (--keep) is read back, with the times it took."""
    out, rounds = work / f"seed{seed}", args.rounds
    if _done(work, seed):
        return json.loads((out / "bench.json").read_text())
    wall = timed(_demo(out, seed, rounds, args.config))[0]
    report = json.loads((out / "report.json").read_text())
    report["wall_s"] = wall
    report["selection_right"] = [
        selection_truth(out / f"round{r}-train", out / "round1-oracle" if r == 1 else None)
        for r in range(1, rounds + 1)
    ]
    if args.controls:
        report["controls"] = {kind: _control(out, seed, kind, args.config) for kind in CONTROLS}
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    print(f"seed {seed}: done in {wall:.0f} s", flush=True)
    return report


def selection_truth(train_dir: Path, oracle_dir: Path | None = None) -> float:
    """The share of a filter output's samples whose pseudo-label's top-1 is the digit's true
    class; with `oracle_dir`, the same shards written there with the true class as a hard
    label in place of the teacher's (the oracle control's training data)."""
    truth = load_digits().target
    right = total = 0
    for shard in sorted(train_dir.glob("*.tar")):
        samples = []
        for sample in iter_shard(str(shard), lambda drop: None):
            true = int(truth[int(sample["__key__"][len("digit") :].split("_")[0])])
            label = decode_pseudo(sample["__key__"], sample[PSEUDO_EXT])
            right, total = right + (label.top1 == true), total + 1
            samples.append(labeled_sample(sample["__key__"], "png", sample["png"], true))
        if oracle_dir is not None:
            oracle_dir.mkdir(exist_ok=True)
            write_shard(str(oracle_dir / shard.name), samples)
    if oracle_dir is not None:
        shutil.copy(train_dir / "classes.json", oracle_dir / "classes.json")
    return right / max(total, 1)


def _control(out: Path, seed: int, kind: str, config: str | None) -> dict:
    """A control trained beside a finished demo, in a process of its own like the demo."""
    scores = out / f"control-{kind}.json"
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[6]); from bench.controls import run_control; "
        "from pathlib import Path; Path(sys.argv[4]).write_text(json.dumps(run_control("
        "sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[5] or None)))"
    )
    args = [str(out), str(seed), kind, str(scores), config or "", str(ROOT)]
    timed([sys.executable, "-c", code, *args])
    return json.loads(scores.read_text())


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the two ends of its 95% confidence interval (Student's t, n - 1 degrees of
    freedom): the differences are paired by seed, so this is the paired t interval."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def difference_row(name: str, values: list[float]) -> str:
    mean, low, high = interval(values)
    return (
        f"| {name} | {len(values)} | **{mean:+.2f}** | {low:+.2f} to {high:+.2f} | "
        f"{min(values):+.1f} | {', '.join(f'{v:+.1f}' for v in values)} |"
    )


def _seconds_to_round(report: dict, last: int) -> float:
    """Seconds of the stages up to round `last`'s evaluation: a one-round demo's time when
    `last` is 1 (plus the process start-up, a few seconds)."""
    later = tuple(f"round {r} " for r in range(last + 1, len(report["rounds"]) + 1))
    return sum(s for name, s in report["timings"].items() if not name.startswith(later))


def _tables(args: argparse.Namespace, reports: list[dict]) -> tuple[list[str], dict]:
    def top1(rep: dict, who: str) -> float:  # points of top-1
        if who == "teacher":
            return 100 * rep["teacher"]["top1"]
        if who.startswith("round"):
            return 100 * rep["rounds"][int(who[-1]) - 1]["student"]["top1"]
        return 100 * rep["controls"][who]["top1"]

    models = ["teacher"] + [f"round{r}" for r in range(1, args.rounds + 1)]
    models += list(CONTROLS) if args.controls else []
    heads = ["round-0 teacher"] + [f"round {r} student" for r in range(1, args.rounds + 1)]
    heads += [f"{kind} control" for kind in CONTROLS] if args.controls else []
    rows = [
        "| seed | " + " | ".join(heads) + " | pseudo-labels (right) per round | round 1 s |",
        "|---" * (len(heads) + 3) + "|",
    ]
    for seed, rep in zip(args.seeds, reports, strict=True):
        selections = ", ".join(
            f"{x['pseudo_labels']} ({100 * right:.0f}%)"
            for x, right in zip(rep["rounds"], rep["selection_right"], strict=True)
        )
        rows.append(
            f"| {seed} | "
            + " | ".join(f"{top1(rep, m):.1f}" for m in models)
            + f" | {selections} | {_seconds_to_round(rep, 1):.0f} |"
        )
    rows.append(
        "| **mean** | "
        + " | ".join(f"{statistics.mean(top1(rep, m) for rep in reports):.1f}" for m in models)
        + " | | |"
    )
    differences: dict[str, list[float]] = {}
    pairs = []
    if args.controls:
        pairs.append((PRIMARY, "round1", "supervised"))
    pairs.append(("round 1 student - round-0 teacher", "round1", "teacher"))
    for r in range(2, args.rounds + 1):
        pairs.append((f"round {r} student - round {r - 1} student", f"round{r}", f"round{r - 1}"))
        pairs.append((f"round {r} student - round-0 teacher", f"round{r}", "teacher"))
    if args.controls:
        pairs.append(("round 1 student - noise-free control", "round1", "noise-free"))
        pairs.append(("oracle control - round 1 student (headroom)", "oracle", "round1"))
    for name, a, b in pairs:
        differences[name] = [round(top1(rep, a) - top1(rep, b), 4) for rep in reports]
    rows += [
        "",
        "| difference, points of top-1 (paired by seed) | n | mean | 95% CI | min | per seed |",
        "|---|---|---|---|---|---|",
    ]
    rows += [difference_row(name, values) for name, values in differences.items()]
    first = reports[0]
    stages = ", ".join(f"{name} {s:.0f} s" for name, s in first["timings"].items())
    rounds_s = [_seconds_to_round(rep, 1) for rep in reports]
    rows += [
        "",
        f"Primary endpoint: {PRIMARY}. Students: "
        + ", ".join(f"round {x['round']} {x['model']}" for x in first["rounds"])
        + f". Pseudo-labels right: the share whose top-1 is the class the unlabeled split "
        f"hides (scoring only). {args.jobs} seeds ran at a time, each on about one core; "
        f"round 1's stage time per seed {min(rounds_s):.0f} to {max(rounds_s):.0f} s under "
        f"that load. Stages of seed {args.seeds[0]}: {stages}.",
    ]
    figures = {
        "seeds": args.seeds,
        "rounds": args.rounds,
        "top1": {m: [top1(rep, m) for rep in reports] for m in models},
        "selection_right": [rep["selection_right"] for rep in reports],
        "pseudo_labels": [[x["pseudo_labels"] for x in rep["rounds"]] for rep in reports],
        "differences": {
            name: {"values": values, "mean_ci": interval(values)}
            for name, values in differences.items()
        },
        "round1_s": rounds_s,
        "wall_s": [rep["wall_s"] for rep in reports],
    }
    return rows, figures


if __name__ == "__main__":
    main()
