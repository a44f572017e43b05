"""Beam pipeline options and runs: ours are parsed by the CLI, every other option goes to the
runner; a Dataflow dry run (`--dry_run=True`) builds the real job offline and describes it."""

from __future__ import annotations

import os
from collections.abc import Callable

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DebugOptions,
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
    TestOptions,
    WorkerOptions,
)
from apache_beam.runners.runner import PipelineResult

from rs_pseudolabel.data.errors import UsageError

DEFAULT_RUNNER = "DirectRunner"
DIRECT_RUNNERS = ("DirectRunner", "direct")  # Beam's names for its local runner


def beam_options(
    runner: str | None, beam_args: list[str], local_workers: int | None = None
) -> PipelineOptions:
    """Build the runner's options, unchanged but for local defaults: on the DirectRunner,
    `local_workers` threads (default: the cores) unless --direct_num_workers is given.

    Unknown flags are an error here: Beam itself would drop them with a log line, and a
    mistyped `--temp_location` should not reach Dataflow as silence.
    """
    args = list(beam_args)
    runner = runner or DEFAULT_RUNNER
    args.append(f"--runner={runner}")
    if runner in DIRECT_RUNNERS:
        given = " ".join(args)
        if "--direct_num_workers" not in given:
            args.append(f"--direct_num_workers={local_workers or os.cpu_count() or 1}")
        if "--direct_running_mode" not in given:
            args.append("--direct_running_mode=multi_threading")
    options = PipelineOptions(args)
    known = options.get_all_options()
    unknown = set(options.get_all_options(retain_unknown_options=True)) - set(known)
    if unknown:
        raise UsageError(f"unknown pipeline option --{sorted(unknown)[0]}")
    return options


def is_direct(options: PipelineOptions) -> bool:
    """Whether the job runs on Beam's local runner, in or beside this process."""
    return options.view_as(StandardOptions).runner in DIRECT_RUNNERS


def workers_in_process(options: PipelineOptions) -> bool:
    """Whether the runner's workers are threads of this process (the DirectRunner's default
    modes), so that what the launcher starts for them is theirs to use."""
    mode = options.get_all_options().get("direct_running_mode")
    return is_direct(options) and mode in ("in_memory", "multi_threading")


def local_runner(options: PipelineOptions):
    """The local runner every stage and test runs: Beam's FnApiRunner, in this process, named
    here. Beam's DirectRunner would first try its PrismRunner, which downloads a Go binary
    at run time and runs the job elsewhere when the download succeeds: the runner would
    depend on the network. Prism stays a choice (`--runner PrismRunner`), never a fall-back."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(info))


def is_dry_run(options: PipelineOptions) -> bool:
    """Beam's own `--dry_run=True`: DataflowRunner builds the job and returns unsubmitted."""
    return bool(options.view_as(TestOptions).dry_run)


def run_pipeline(
    options: PipelineOptions, build: Callable[[beam.Pipeline], object]
) -> PipelineResult:
    """Build a pipeline with `build` and run it to the end (or, in a dry run, build only)."""
    runner = local_runner(options) if is_direct(options) else None
    pipeline = beam.Pipeline(runner=runner, options=options)
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    return result


def dry_run_summary(job: dict, built: str, inputs: str) -> str:
    """The line a stage prints for a dry run (`describe_job`'s description of it)."""
    return (
        f"Dry run: {job['runner']} built the {built} over {job['input_shards']} {inputs} "
        f"(steps {', '.join(job.get('steps', []))}; worker image "
        f"{job['sdk_container_image']}) and submitted nothing; no output was written."
    )


def describe_job(result: PipelineResult, options: PipelineOptions) -> dict:
    """What a runner was given: the steps, the worker image(s), the service options and
    experiments; from the Dataflow job itself when the runner built one."""
    description: dict = {
        "runner": options.view_as(StandardOptions).runner,
        "dry_run": is_dry_run(options),
    }
    job = getattr(result, "job", None)
    if job is not None:
        from apache_beam.portability.api import beam_runner_api_pb2

        proto = job.proto_pipeline
        top = [
            proto.components.transforms[child].unique_name
            for root in proto.root_transform_ids
            for child in proto.components.transforms[root].subtransforms
        ]
        description["steps"] = top
        description["worker_images"] = sorted(
            {
                beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
                for env in proto.components.environments.values()
                if env.urn == "beam:env:docker:v1"
            }
        )
        options = job.options
    cloud = options.view_as(GoogleCloudOptions)
    worker = options.view_as(WorkerOptions)
    description.update(
        {
            "project": cloud.project,
            "region": cloud.region,
            "temp_location": cloud.temp_location,
            "sdk_container_image": worker.sdk_container_image,
            "machine_type": worker.machine_type,
            "max_num_workers": worker.max_num_workers,
            "dataflow_service_options": list(cloud.dataflow_service_options or []),
            "experiments": list(options.view_as(DebugOptions).experiments or []),
        }
    )
    return description
