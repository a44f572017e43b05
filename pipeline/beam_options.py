"""Beam pipeline options: ours are parsed by the CLI, every other option goes to the runner."""

from __future__ import annotations

import os

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli_errors import UsageError

DEFAULT_RUNNER = "DirectRunner"


def beam_options(runner: str | None, beam_args: list[str]) -> PipelineOptions:
    """Build the runner's options, unchanged but for local defaults.

    Unknown flags are an error here: Beam itself would drop them with a log line, and a
    mistyped `--temp_location` should not reach Dataflow as silence.
    """
    args = list(beam_args)
    runner = runner or DEFAULT_RUNNER
    args.append(f"--runner={runner}")
    if runner in ("DirectRunner", "direct"):
        given = " ".join(args)
        if "--direct_num_workers" not in given:
            args.append(f"--direct_num_workers={os.cpu_count() or 1}")
        if "--direct_running_mode" not in given:
            args.append("--direct_running_mode=multi_threading")
    options = PipelineOptions(args)
    known = options.get_all_options()
    unknown = set(options.get_all_options(retain_unknown_options=True)) - set(known)
    if unknown:
        raise UsageError(f"unknown pipeline option --{sorted(unknown)[0]}")
    return options
