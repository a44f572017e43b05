"""The `pipeline` command: one parser per stage. A mistake the user can fix is one clear line
and exit status 2; a bug is one line saying so, exit status 1, and its traceback in a file
(printed with --debug or PIPELINE_DEBUG=1)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TextIO

from rs_pseudolabel.data.errors import USER_ERRORS, PeerFailed, UsageError, WorkerBug, in_words
from rs_pseudolabel.data.options import add_flags, flag_values
from rs_pseudolabel.data.progress import say
from rs_pseudolabel.pipeline.options import (
    DemoArgs,
    DigitsArgs,
    EvalArgs,
    FilterArgs,
    IngestArgs,
    LabelArgs,
    ModelsArgs,
    StatsArgs,
    add_stage_flags,
)
from rs_pseudolabel.students.config import add_arguments, train_flag_values

EXIT_USAGE = 2  # a mistake the user can fix
EXIT_BUG = 1  # a bug in this project


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus a message; we print one line naming the command."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _given(cls: type, args: argparse.Namespace):
    """The command's options (a dataclass of pipeline/options.py) from its flags."""
    return cls(**flag_values(cls, args))


def _cmd_data_digits(args: argparse.Namespace) -> None:
    from rs_pseudolabel.pipeline.data_commands import run_digits

    a = _given(DigitsArgs, args)
    run_digits(
        a.out, labeled=a.labeled, seed=a.seed, shard_size=a.shard_size, overwrite=a.overwrite
    )


def _cmd_data_ingest(args: argparse.Namespace) -> None:
    from rs_pseudolabel.pipeline.data_commands import run_ingest

    a = _given(IngestArgs, args)
    run_ingest(a.src, a.out, shard_size=a.shard_size, prefix=a.prefix, overwrite=a.overwrite)


def _cmd_label(args: argparse.Namespace) -> None:
    from rs_pseudolabel.pipeline.label import run, summary

    print(summary(run(_given(LabelArgs, args), args.beam_args)))


def _cmd_filter(args: argparse.Namespace) -> None:
    from rs_pseudolabel.pipeline.filter import run, summary

    print(summary(run(_given(FilterArgs, args), args.beam_args)))


def _cmd_stats(args: argparse.Namespace) -> None:
    from rs_pseudolabel.pipeline.source_roots import source_roots
    from rs_pseudolabel.pipeline.stats import run

    a = _given(StatsArgs, args)
    _output_files(a, {"json": None, "plot": ".png", "samples": ".png"})
    if a.source_root and not a.samples:
        raise UsageError("--source-root says where --samples finds images: pass --samples too")
    source_roots(a.source_root)  # a typo is said before the statistics are made
    beam_args = args.beam_args + ([f"--runner={a.runner}"] if a.runner else [])
    run(a.shards, json_path=a.json, plot_path=a.plot, beam_args=beam_args, sample=a.sample,
        scan=a.scan)  # fmt: skip
    if a.samples:
        from rs_pseudolabel.pipeline.samples_sheet import write_samples

        drawn = write_samples(a.shards, a.samples, source_roots=list(a.source_root))
        print(f"{drawn} sample images in {a.samples}")


def _cmd_train(args: argparse.Namespace) -> None:
    from rs_pseudolabel.students.train import train

    train(**train_flag_values(args))


def _output_files(args: object, flags: dict[str, str | None]) -> None:
    """The files a command will write, checked before its work (an evaluation, a scan) and
    not after: a folder in a file's place, or a PNG under another suffix, is one line."""
    from rs_pseudolabel.data.storage import is_dir

    for name, suffix in flags.items():
        path = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if path is None:
            continue
        if is_dir(path):
            raise UsageError(f"{flag} {path} is a folder: give the name of a file to write")
        if suffix and not path.lower().endswith(suffix):
            raise UsageError(f"{flag} writes a PNG: give a name ending in {suffix}, not {path}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from rs_pseudolabel.students.eval import evaluate_run

    a = _given(EvalArgs, args)
    _output_files(a, {"json": None})
    scores = evaluate_run(a.checkpoint, a.data, batch_size=a.batch_size, device=a.device)
    if a.json:
        from rs_pseudolabel.data.storage import write_json

        write_json(a.json, scores)
    print(
        f"top-1 {100 * scores['top1']:.2f}%  top-5 {100 * scores['top5']:.2f}%  "
        f"on {scores['samples']} samples ({scores['dropped']} unusable) at "
        f"{scores['eval_size']} px"
    )


def _cmd_demo(args: argparse.Namespace) -> None:
    from rs_pseudolabel.pipeline.demo import run, table

    a = _given(DemoArgs, args)
    print(table(run(a.out, seed=a.seed, rounds=a.rounds, recipe_path=a.config)))


def _cmd_models(args: argparse.Namespace) -> None:
    from rs_pseudolabel.teachers import format_table, models_table
    from rs_pseudolabel.teachers.table import TIMM_NOTE

    names = list(_given(ModelsArgs, args).name)
    print(format_table(models_table(names or None)))
    if not names:
        print(f"\n{TIMM_NOTE}")


def build_parser() -> argparse.ArgumentParser:
    """Every command and its flags, a function per group of commands."""
    parser = _Parser(
        prog="pipeline",
        description="Pseudo-labeling with a ResNet-RS teacher, Apache Beam and WebDataset.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_data_commands(commands)
    _add_beam_stages(commands)
    _add_training(commands)
    _add_demo(commands)
    _add_stats(commands)
    _add_models(commands)
    _add_debug(parser)
    return parser


Commands = argparse._SubParsersAction


def _add_data_commands(commands: Commands) -> None:
    """`data digits` and `data ingest`: shards made or brought in."""
    data = commands.add_parser("data", help="make or bring in image shards")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    digits = data_commands.add_parser(
        "digits", help="write scikit-learn's handwritten digits as labeled/unlabeled/val shards"
    )
    add_flags(digits, DigitsArgs)
    digits.set_defaults(func=_cmd_data_digits)
    ingest = data_commands.add_parser(
        "ingest", help="re-shard an ImageFolder, a folder of images, or existing shards"
    )
    add_flags(ingest, IngestArgs)
    ingest.set_defaults(func=_cmd_data_ingest)


def _add_beam_stages(commands: Commands) -> None:
    """`label` and `filter`, whose flags the option declarations give."""
    label = commands.add_parser(
        "label",
        help="label unlabeled shards with a teacher (Beam job)",
        epilog="Any other option (--temp_location, --project, ...) goes to the Beam runner.",
    )
    add_stage_flags(label, LabelArgs)
    label.set_defaults(func=_cmd_label, beam=True)

    filt = commands.add_parser(
        "filter",
        help="filter, deduplicate and class-balance pseudo-labels into training shards (Beam job)",
        epilog="Any other option (--temp_location, --project, ...) goes to the Beam runner.",
    )
    add_stage_flags(filt, FilterArgs)
    filt.set_defaults(func=_cmd_filter, beam=True)


def _add_training(commands: Commands) -> None:
    """`train-student` (the recipe's flags) and `eval`."""
    train = commands.add_parser(
        "train-student",
        help="train a (noised) student on labeled + pseudo-labeled shards; torchrun for DDP",
        epilog="Without --pseudo this is plain supervised training: a round-0 teacher.",
    )
    add_arguments(train)
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser(
        "eval", help="top-1 / top-5 of a run directory on labeled shards"
    )
    add_flags(evaluate, EvalArgs)
    evaluate.set_defaults(func=_cmd_eval)


def _add_demo(commands: Commands) -> None:
    demo = commands.add_parser("demo", help="the whole pipeline on the embedded digits")
    add_flags(demo, DemoArgs)
    demo.set_defaults(func=_cmd_demo)


def _add_stats(commands: Commands) -> None:
    stats = commands.add_parser(
        "stats",
        help="shard statistics: a table, --json, a --plot PNG and --samples images",
        epilog="Any other option (--temp_location, --project, ...) goes to the Beam runner.",
    )
    add_flags(stats, StatsArgs)
    stats.set_defaults(func=_cmd_stats, beam=True)


def _add_models(commands: Commands) -> None:
    models = commands.add_parser(
        "models", help="the model table (ResNet-RS rows; timm:NAME for any timm model)"
    )
    add_flags(models, ModelsArgs)
    models.set_defaults(func=_cmd_models)


def _add_debug(parser: argparse.ArgumentParser) -> None:
    # Before the command or after it: `pipeline --debug stats ...` and `pipeline stats
    # --debug ...` (two names: a subcommand's default would overwrite the first's value).
    debug_help = (
        "on any error print its full traceback, a worker's included (also: PIPELINE_DEBUG=1)"
    )
    parser.add_argument("--debug", dest="debug_first", action="store_true", help=debug_help)
    for command in _leaf_parsers(parser):
        command.add_argument("--debug", action="store_true", help=debug_help)


def env_flag(name: str) -> bool:
    """A yes/no environment variable: unset, empty, 0, false, no or off is no; 1, true, yes
    or on is yes; anything else is refused in one line rather than read as yes."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise UsageError(f"{name}={os.environ[name]!r}: use 1, true, yes or on, or 0, false, no or off")


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that run a command: those without subcommands of their own."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for sub in subs for p in sub.choices.values() for leaf in _leaf_parsers(p)]


def _report_bug(command: str, exc: Exception, debug: bool) -> int:
    """A bug, not a mistake: one line saying so and where its traceback is (a worker's own,
    or this process's, written to a file), or with --debug the traceback itself."""
    if isinstance(exc, WorkerBug):
        trace, where = exc.trace, exc.where
    else:
        trace = "".join(traceback.format_exception(exc))
        fd, where = tempfile.mkstemp(prefix=f"pipeline-{command}-", suffix=".traceback")
        with os.fdopen(fd, "w") as f:
            f.write(trace)
    if debug:
        say(trace.rstrip("\n"))
    line = (
        f"pipeline {command}: internal error (a bug in rs-pseudolabel, please report it): "
        f"{exc if isinstance(exc, WorkerBug) else f'{type(exc).__name__}: {exc}'}; "
        f"its traceback is in {where}" + ("" if debug else " (or rerun with --debug)")
    )
    say(line)
    _tell_torchrun(line)
    return EXIT_BUG


STOPPED = (130, 128 + signal.SIGTERM)  # the exit codes of Ctrl-C and of SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, what schedulers, `docker stop` and `kill` send: it ends a command as Ctrl-C
    does (what was written is complete or absent by design)."""


def _stop_on_sigterm() -> None:
    """Raise `Terminated` in this process on SIGTERM; a process forked from it (a decode or
    loader worker) ends at once and quietly, as the default action would, and leaves the
    message to this one."""
    here = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != here:
            os._exit(128 + signum)
        _quiet()  # the runner's threads log and raise as the stop cuts them off
        raise Terminated

    signal.signal(signal.SIGTERM, handler)


class _MainThreadOnly(io.TextIOBase):
    """stderr once a command is being stopped: the main thread's writes (its own line) go
    through, the runner's threads' are dropped (Beam's SDK worker prints the traceback of a
    bundle the stop cut off straight to stderr, not through logging)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread():
            return self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self) -> str:
        return self.stream.encoding


def _quiet() -> None:
    """A command being stopped says so in its own line: what the runner's threads log,
    print or raise as the stop cuts them off is expected, and not shown."""
    logging.disable(logging.CRITICAL)
    threading.excepthook = lambda args: None
    if not isinstance(sys.stderr, _MainThreadOnly):
        sys.stderr = _MainThreadOnly(sys.stderr)


def _leave_now(code: int) -> None:
    """End a stopped command without the interpreter's teardown, whose C++ threads of the
    runner, cut off mid-job, would abort the process ("terminate called without an active
    exception") after our line: multiprocessing's own exit steps first (worker processes
    ended, their semaphores released), then the streams flushed, then out."""
    import multiprocessing.util

    _quiet()
    # A decode pool still starting its processes is let finish first: its semaphores,
    # released by the steps below, would vanish under a process being started, which then
    # prints a traceback of its own.
    decode = sys.modules.get("rs_pseudolabel.pipeline.label_decode")
    if decode is not None:
        decode.settle_pools(timeout=30)
    # A pool stopped with tasks in flight may find its result thread gone and say so with
    # a traceback from its finalizer; its processes are ended by the steps after it.
    with contextlib.redirect_stderr(io.StringIO()):
        multiprocessing.util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _tell_torchrun(line: str) -> None:
    """Under torchrun, the failing rank's own line goes into the error file torchrun gave it,
    so that torchrun's closing report names it as the root cause ("traceback : pipeline
    train-student: error: ...") instead of a link to its documentation. The record is the
    one torch.distributed.elastic's own `record` writes, with our line for its call stack."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"py_callstack": line, "timestamp": str(int(time.time()))}
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": info}}, f)
    except OSError:  # the report then says what it says without it
        pass


def _how_to_continue(args: argparse.Namespace) -> str:
    """What continues a stopped command: the same command, except a training run, which
    continues only with --resume (without it, its folder is refused as another run's)."""
    if args.command == "train-student" and not args.resume:
        return "rerun it with --resume to continue after its last finished epoch"
    return "rerun the same command to resume"


def main(argv: Sequence[str] | None = None) -> int:
    # Beam logs import-time warnings about optional cloud clients to the root logger; the user
    # sees our summaries and warnings unless they ask for the runner's logs.
    level = os.environ.get("PIPELINE_LOG_LEVEL")
    logging.basicConfig(level=(level or "ERROR").upper())
    if not level:  # the storage clients log each request they give up on, with a traceback;
        # the error that ends the command says it once, in one line
        for client in ("gcsfs", "s3fs"):
            logging.getLogger(client).setLevel(logging.CRITICAL)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "beam", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.beam_args = extra
    func: Callable[[argparse.Namespace], None] = args.func
    _stop_on_sigterm()
    try:
        debug = args.debug or args.debug_first or env_flag("PIPELINE_DEBUG")
    except UsageError as exc:
        say(f"pipeline {args.command}: error: {exc}")
        return EXIT_USAGE
    try:
        func(args)
    except USER_ERRORS as exc:
        if debug:
            say("".join(traceback.format_exception(exc)).rstrip("\n"))
        kind = "stopped" if isinstance(exc, PeerFailed) else "error"
        line = f"pipeline {args.command}: {kind}: {in_words(exc)}"
        say(line)
        if kind == "error":
            _tell_torchrun(line)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        said = "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
        say(f"pipeline {args.command}: {said}; {_how_to_continue(args)}")
        return STOPPED[1] if isinstance(exc, Terminated) else STOPPED[0]
    except Exception as exc:
        return _report_bug(args.command, exc, debug)
    return 0


def entry() -> None:
    """The `pipeline` command and `python -m rs_pseudolabel.pipeline`."""
    code = main()
    if code in STOPPED:
        _leave_now(code)
    # torch and Beam leave millions of objects behind, and the interpreter's last collection
    # traces them all: about 0.7 s of every command's exit. Everything is written and
    # committed by now, so freeze them instead.
    gc.freeze()
    sys.exit(code)
