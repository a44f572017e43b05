"""The `pipeline` command: one parser per stage, one clear line and exit status 2 on bad input."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the command line or its inputs that the user can fix."""


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus a message; we print one line naming the command."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _cmd_data_digits(args: argparse.Namespace) -> None:
    from pipeline.data_commands import run_digits

    run_digits(args.out, labeled=args.labeled, seed=args.seed, shard_size=args.shard_size)


def _cmd_data_ingest(args: argparse.Namespace) -> None:
    from pipeline.data_commands import run_ingest

    run_ingest(args.src, args.out, shard_size=args.shard_size, prefix=args.prefix)


def _cmd_models(args: argparse.Namespace) -> None:
    from teachers import format_table, models_table

    print(format_table(models_table(args.name or None)))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pipeline",
        description="Pseudo-labeling with a ResNet-RS teacher, Apache Beam and WebDataset.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = commands.add_parser("data", help="make or bring in image shards")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    digits = data_commands.add_parser(
        "digits", help="write scikit-learn's handwritten digits as labeled/unlabeled/val shards"
    )
    digits.add_argument("--out", required=True, help="output folder")
    digits.add_argument("--labeled", type=_positive, default=200, help="labeled images (200)")
    digits.add_argument("--seed", type=int, default=0, help="split seed (0)")
    digits.add_argument("--shard-size", type=_positive, default=256, help="samples per shard")
    digits.set_defaults(func=_cmd_data_digits)

    ingest = data_commands.add_parser(
        "ingest", help="re-shard an ImageFolder, a folder of images, or existing shards"
    )
    ingest.add_argument("src", help="folder, shard, glob or brace pattern (local or fsspec URL)")
    ingest.add_argument("--out", required=True, help="output folder")
    ingest.add_argument("--shard-size", type=_positive, default=1000, help="samples per shard")
    ingest.add_argument("--prefix", default="part", help="shard name prefix (part)")
    ingest.set_defaults(func=_cmd_data_ingest)

    models = commands.add_parser("models", help="the ResNet-RS model table")
    models.add_argument("name", nargs="*", help="only these models")
    models.set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (UsageError, ValueError, OSError) as exc:
        if os.environ.get("PIPELINE_DEBUG"):
            raise
        print(f"pipeline {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            f"pipeline {args.command}: interrupted; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    return 0
