"""`pipeline train-student`: a Noisy Student trains on labeled plus pseudo-labeled shards.

Read `main` top to bottom: inputs, plan, model, resume, then a loop of
`train_one_epoch` and `evaluate`. Every step takes a labeled batch B and a pseudo-labeled
batch ceil(ratio * B), in micro-batches whose gradients accumulate, each concatenating its
share of both kinds into one forward pass. Without pseudo-labeled shards
it is plain supervised training, which is how the round-0 teacher is made. Under torchrun it
trains data-parallel (DDP: nccl on GPUs, gloo on CPUs).

    pipeline train-student --model rs-mini --labeled D/labeled --val D/val --out RUN
    torchrun --nproc_per_node 8 -m rs_pseudolabel.pipeline train-student --config imagenet ...
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from rs_pseudolabel.data.classes import read_class_names
from rs_pseudolabel.data.device import DeviceFeed, Normalizer, memory_format
from rs_pseudolabel.data.errors import PeerFailed, UsageError
from rs_pseudolabel.data.manifest import inputs_record
from rs_pseudolabel.data.progress import progress_bar, say
from rs_pseudolabel.data.specs import shard_entries
from rs_pseudolabel.data.storage import Entry, absolute, is_dir, parent
from rs_pseudolabel.students import distributed, run_dir
from rs_pseudolabel.students.config import (
    Recipe,
    TrainArgs,
    other_model_note,
    resolve,
)
from rs_pseudolabel.students.data import (
    Counted,
    LabeledDecoder,
    PseudoDecoder,
    count_samples,
    eval_loader,
    has_classes,
    has_samples,
    train_loader,
)
from rs_pseudolabel.students.ema import ModelEma
from rs_pseudolabel.students.eval import evaluate
from rs_pseudolabel.students.freeze import NOTHING, freeze_through, keep_frozen
from rs_pseudolabel.students.losses import student_loss
from rs_pseudolabel.students.presets import train_preset
from rs_pseudolabel.students.seeding import seed_everything
from rs_pseudolabel.teachers import (
    create_model,
    describe_teacher,
    export_run,
    get_config,
    is_run_dir,
    load_teacher,
)
from rs_pseudolabel.teachers.checkpoint import TeacherInfo, run_info
from rs_pseudolabel.teachers.inference import eval_pixels
from rs_pseudolabel.teachers.registry import ModelRow

SHOW_EVERY = 10  # steps between two readings of the losses for the progress bar
# A micro-batch: (labeled uint8 images, labels, pseudo images or None, pseudo soft targets
# or None); as the loaders give it, with the samples they dropped since the last, by reason.
Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
Loaded = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict]
Splits = list[tuple[slice, slice]]


# --- the recipe's numbers ----------------------------------------------------------------


def peak_lr(lr_per_256: float, batch_size: int) -> float:
    """The linear scaling rule on the global *labeled* batch.

    The loss is CE(labeled) + ratio * CE(pseudo), both batch means, i.e. (1 + ratio) times
    the mean over all B * (1 + ratio) images of the step; scaling by B therefore applies the
    rule to the whole concatenated batch, and reduces to the plain rule without pseudo-labels.
    """
    return lr_per_256 * batch_size / 256


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup_steps`, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def lr_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, first_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine, stepped every optimizer step, from `first_step` on (a resumed
    run's; its optimizer state, loaded first, holds the peak LR as `initial_lr`).

    A run at the tail of a longer schedule (`schedule_epochs`) starts at that schedule's step
    and ends at its last one: `first_step` is where it starts and `total_steps` the whole
    schedule's length.

    Not SequentialLR(LinearLR, CosineAnnealingLR): those keep their horizon (T_max, the
    milestones) in a state dict, so a run resumed with more epochs would go on decaying to
    the old end, and CosineAnnealingLR computes each LR from the previous one, so it cannot
    take a new horizon mid-run either. A closed form of the step needs nothing saved but the
    step: a resumed run follows the schedule of the epochs it is given now.
    """
    for group in optimizer.param_groups:  # what LambdaLR scales; a resumed run has it
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps),
        last_epoch=first_step - 1,
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only; biases and norm scales/shifts are exempt.
    Frozen parameters (`students.freeze`) are in neither: the optimizer never sees them."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim > 1]
    no_decay = [p for p in trained if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --- one epoch ---------------------------------------------------------------------------


def mixed_parts(labeled: Iterable, pseudo: Iterable | None) -> Iterator[Loaded]:
    """Pair each labeled micro-batch with a pseudo-labeled one (both streams are endless,
    cut at the same step's micro-batch sizes)."""
    if pseudo is None:
        for images, labels, drops in labeled:
            yield images, labels, None, None, drops
    else:
        for (images, labels, drops), (pseudo_images, targets, more) in zip(
            labeled, pseudo, strict=False
        ):
            yield images, labels, pseudo_images, targets, dict(Counter(drops) + Counter(more))


def on_device(parts: Iterable[Loaded], feed: DeviceFeed) -> Iterator[Loaded]:
    """The micro-batches with their tensors on the feed's device, one ahead: on CUDA the
    copy of the next (from the loaders' pinned memory, on a side stream) runs while the
    forward and backward of this one do; on CPU the tensors stay where they are."""

    def send(part: Loaded) -> tuple[Loaded, torch.cuda.Event | None]:
        with feed.context():
            moved = tuple(None if t is None else feed.to_device(t) for t in part[:4])
        return (*moved, part[4]), feed.mark()

    ahead = None
    for part in parts:
        sent = send(part)
        if ahead is not None:
            yield _accepted(*ahead)
        ahead = sent
    if ahead is not None:
        yield _accepted(*ahead)


def _accepted(part: Loaded, ready: torch.cuda.Event | None) -> Loaded:
    for tensor in part[:4]:
        if tensor is not None:
            DeviceFeed.accept(tensor, ready)
    return part


def micro_splits(labeled: int, pseudo: int, micro_batch: int | None) -> Splits:
    """(labeled, pseudo) slices of a step's batch, one pair per micro-batch of at most about
    `micro_batch` images, each with its even share of both kinds (0 or None: one part); never
    more parts than images of either kind, so no part lacks one."""
    parts = 1 if not micro_batch else max(1, math.ceil((labeled + pseudo) / micro_batch))
    parts = min(parts, labeled, pseudo or labeled)

    def piece(n: int, i: int) -> slice:
        return slice(round(i * n / parts), round((i + 1) * n / parts))

    return [(piece(labeled, i), piece(pseudo, i)) for i in range(parts)]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    parts: Iterable[Part],
    splits: Splits,
    recipe: Recipe,
    normal: Normalizer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over a labeled (+ pseudo-labeled) batch of uint8 images given as
    the micro-batches `splits` cuts it in, taken from `parts` one at a time as they come
    (from the loaders), their gradients accumulated (DDP synchronises only the last): each
    is normalised on the model's device (`normal`) and its loss weighted by its share of the
    step's images of each kind, so the step's gradient is the whole batch's. Returns the
    step's (loss, labeled loss, pseudo loss), on the device."""
    device = normal.device
    on_cuda = device.type == "cuda"
    n, m = splits[-1][0].stop, splits[-1][1].stop
    totals = [torch.zeros((), device=device) for _ in range(3)]
    optimizer.zero_grad(set_to_none=True)
    for j, ((images, labels, pseudo_images, targets), (lab, pse)) in enumerate(
        zip(parts, splits, strict=True)
    ):
        x = normal(images if not m else torch.cat([images, pseudo_images]))
        y = labels.to(device, non_blocking=True)
        t = None if not m else targets.to(device, non_blocking=True)
        shares = ((lab.stop - lab.start) / n, (pse.stop - pse.start) / max(m, 1))
        last = j == len(splits) - 1
        sync = (
            model.no_sync()
            if isinstance(model, DistributedDataParallel) and not last
            else nullcontext()
        )
        with sync:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
                logits = model(x)
            loss, labeled_loss, pseudo_loss = student_loss(
                logits,
                y,
                t,
                recipe.unlabeled_ratio,
                recipe.label_smoothing,
                recipe.temperature,
                shares,
            )
            loss.backward()
        totals[0] += loss.detach()
        totals[1] += shares[0] * labeled_loss
        totals[2] += shares[1] * pseudo_loss
    optimizer.step()
    return totals[0], totals[1], totals[2]


class _Taken:
    """The micro-batches of one step from the loaders, timing the wait for each and
    counting what the loaders dropped."""

    def __init__(self, source: Iterator[Loaded], count: int, dropped: Counter) -> None:
        self.source, self.count, self.dropped, self.waited = source, count, dropped, 0.0

    def __iter__(self) -> Iterator[Part]:
        for _ in range(self.count):
            asked = time.perf_counter()
            *part, drops = next(self.source)
            self.waited += time.perf_counter() - asked
            self.dropped.update(drops)
            yield tuple(part)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: ModelEma,
    parts: Iterable[Loaded],
    steps: int,
    splits: Splits,
    recipe: Recipe,
    normal: Normalizer,
    world: int = 1,
    bar: tqdm | None = None,
    frozen: Sequence[nn.Module] = (),
) -> dict:
    """`steps` optimizer steps over any iterable of micro-batches cut as `splits` says (the
    shard loaders, or micro-batches held in memory for a benchmark), advancing the run's
    progress `bar` if there is one; returns this process's mean losses, the LR, images/s,
    the share of the time spent waiting for data and the samples the loaders dropped.

    The losses are summed on the device and read every `SHOW_EVERY` steps, so no step waits
    for the device to finish the one before; the wait for data is the time the loop spends
    asking the loaders for the next micro-batch. `frozen` layers stay in eval mode."""
    model.train()
    keep_frozen(frozen)
    unwrapped = model.module if isinstance(model, DistributedDataParallel) else model
    sums = torch.zeros(3, dtype=torch.float64, device=normal.device)  # losses x images
    n, m = splits[-1][0].stop, splits[-1][1].stop
    lr, waited = 0.0, 0.0
    dropped: Counter = Counter()
    start = time.perf_counter()
    source = iter(parts)
    for i in range(steps):
        lr = optimizer.param_groups[0]["lr"]
        taken = _Taken(source, len(splits), dropped)
        losses = train_step(model, optimizer, taken, splits, recipe, normal)
        waited += taken.waited
        scheduler.step()
        ema.update_parameters(unwrapped)
        sums += torch.stack(losses).double() * n
        if bar is not None:
            if i % SHOW_EVERY == 0 or i == steps - 1:
                elapsed = time.perf_counter() - start
                bar.set_postfix(
                    {
                        "loss": f"{sums[0].item() / (n * (i + 1)):.3f}",
                        "img_s": f"{(n + m) * world * (i + 1) / elapsed:.0f}",
                        "data_wait": f"{waited / elapsed:.0%}",
                    }
                    | ({"dropped": sum(dropped.values())} if dropped else {}),
                    refresh=False,
                )
            bar.update()
    distributed.broadcast_buffers(unwrapped, ema.module)
    elapsed = time.perf_counter() - start
    means = (sums / max(n * steps, 1)).tolist()
    stats = dict(zip(("loss", "loss_labeled", "loss_pseudo"), means, strict=True))
    stats["lr"] = lr  # of the epoch's last step
    stats["images_per_s"] = (n + m) * world * steps / elapsed
    stats["data_wait"] = waited / elapsed
    stats["dropped"] = dict(sorted(dropped.items()))
    return stats


# --- the run -----------------------------------------------------------------------------


def _class_count(recipe: Recipe, class_names: list[str] | None, labeled: str) -> int:
    if class_names is not None:
        if recipe.num_classes not in (None, len(class_names)):
            raise UsageError(
                f"num_classes is {recipe.num_classes} but {labeled} has "
                f"{len(class_names)} class names in classes.json"
            )
        return len(class_names)
    if recipe.num_classes is None:
        raise UsageError(f"no classes.json beside {labeled}: set num_classes in the config")
    return recipe.num_classes


def _entries(spec: str | None, what: str) -> list[Entry]:
    if spec is None:
        return []
    try:
        return shard_entries(spec)
    except ValueError as exc:
        raise UsageError(f"{what} shards: {exc}") from None


def _agreeing_classes(labeled: list[str], others: dict[str, list[str]]) -> list[str] | None:
    """The labeled set's class names, after checking that every other split's classes.json
    (and the pseudo-labels', from their teacher) names the same classes in the same order:
    class ids that mean different things in two splits train and score the wrong thing."""
    names = read_class_names(labeled)
    for what, urls in others.items():
        other = read_class_names(urls) if urls else None
        if names is None or other is None or other == names:
            continue
        i = next((i for i, (a, b) in enumerate(zip(names, other, strict=False)) if a != b), None)
        where = (
            f"class {i} is {other[i]!r} there but {names[i]!r} in the labeled set"
            if i is not None
            else f"{len(other)} classes there but {len(names)} in the labeled set"
        )
        raise UsageError(f"the {what} shards' classes.json disagrees: {where}")
    return names


@dataclass
class Inputs:
    """What the run's shards are, checked once on rank 0 (every rank gets its verdict): the
    shards of each split, the class names they agree on, and the samples of an epoch."""

    found: dict[str, list[Entry]]
    class_names: list[str] | None
    epoch_samples: int

    def urls(self, split: str) -> list[str]:
        return [e.url for e in self.found[split]]


@dataclass(frozen=True)
class Run:
    """One training run as its steps read it, resolved once before them: the command's
    arguments, the recipe with what the data decided, the processes, the checked inputs
    and the model's row of the registry."""

    args: TrainArgs
    recipe: Recipe
    env: distributed.Distributed
    inputs: Inputs
    table: ModelRow


@dataclass
class Plan:
    """How the run's steps are cut: per epoch, in all, and each into micro-batches."""

    steps_per_epoch: int
    total_steps: int
    batch: int  # labeled images per step per process
    pseudo_batch: int  # and pseudo-labeled ones
    splits: Splits


@dataclass
class Model:
    """The model being trained, its EMA (what is evaluated and exported), the layers kept
    frozen, and the optimizer over the rest."""

    model: nn.Module
    ema: ModelEma
    frozen: list[nn.Module]
    optimizer: torch.optim.Optimizer


def main(args: TrainArgs, recipe: Recipe, env: distributed.Distributed) -> dict:
    """A run, as its steps: check the inputs, claim the run directory, plan the steps,
    build the model, resume, train the epochs, export."""
    table = get_config(recipe.model)
    _check_setup(args, recipe, env)
    inputs = distributed.on_main(env, lambda: read_inputs(args, recipe))
    # What the data decides is part of the recipe the run records.
    recipe = replace(
        recipe,
        num_classes=_class_count(recipe, inputs.class_names, args.labeled),
        epoch_samples=inputs.epoch_samples,
    )
    run = Run(args, recipe, env, inputs, table)
    fingerprint = run_fingerprint(run)
    folders = sorted({parent(e.url) for entries in inputs.found.values() for e in entries})
    finished = distributed.on_main(
        env, lambda: run_dir.claim_run(args.out, fingerprint, folders, args.resume, args.overwrite)
    )
    if finished:
        if env.is_main:
            print(f"{args.out} already holds this run, finished: nothing to do")
        log = run_dir.read_log(args.out)
        return log[-1] if log else {}
    plan = plan_steps(run)
    built = build_model(run)
    start_epoch, log = resume(run, built)
    if env.is_main:
        run_dir.write_config(args.out, recipe.to_dict())
    log = train_epochs(run, plan, built, start_epoch, log)
    if env.is_main:
        export_run(
            args.out,
            built.ema.module,
            table.name,
            inputs.class_names,
            extra={"recipe": recipe.to_dict()},
            eval_size=recipe.eval_size,
        )
        run_dir.finish_run(args.out, fingerprint, log)
    return log[-1] if log else {}


def _check_setup(args: TrainArgs, recipe: Recipe, env: distributed.Distributed) -> None:
    """What is wrong before any shard is read: a batch that does not divide over the ranks;
    and a note when the recipe file was written for another model."""
    note = other_model_note(args.config, recipe)
    if note and env.is_main:
        say(note)
    if recipe.batch_size % env.world:
        raise UsageError(
            f"batch_size {recipe.batch_size} is global and must divide over {env.world} processes"
        )


def read_inputs(args: TrainArgs, recipe: Recipe) -> Inputs:
    """The labeled (+ pseudo-labeled) training shards and the validation shards, their
    classes, and the samples of an epoch (counted when the recipe leaves it to the data)."""
    found = {
        "labeled": _entries(args.labeled, "labeled"),
        "pseudo": _entries(args.pseudo, "pseudo-labeled"),
        "val": _entries(args.val, "validation"),
    }
    urls = {name: [e.url for e in entries] for name, entries in found.items()}
    names = _agreeing_classes(
        urls["labeled"], {"validation": urls["val"], "pseudo-labeled": urls["pseudo"]}
    )
    small = len(urls["labeled"]) <= SMALL_SET_SHARDS
    counted = count_samples(urls["labeled"]) if small or not recipe.epoch_samples else None
    samples = recipe.epoch_samples or counted.samples
    if samples == 0:
        raise UsageError(f"no image samples in the labeled shards {args.labeled}")
    if counted is not None:
        if recipe.epoch_samples:
            _warn_if_dwarfed(recipe.epoch_samples, counted.samples)
        _warn_of_unlabeled_classes(names or recipe.num_classes, counted)
    if urls["pseudo"] and not has_samples(urls["pseudo"]):
        raise UsageError(f"no image samples in the pseudo-labeled shards {args.pseudo}")
    if urls["val"] and not has_classes(urls["val"]):
        raise UsageError(
            f"the validation shards {args.val} hold images without classes (no .cls): "
            "validate on labeled shards"
        )
    return Inputs(found, names, samples)


def run_fingerprint(run: Run) -> dict:
    """What the run is: its recipe, its inputs, and where its weights start."""
    args, inputs = run.args, run.inputs
    specs = {"labeled": args.labeled, "pseudo": args.pseudo, "val": args.val}
    fingerprint = {
        "recipe": run.recipe.to_dict(),
        "inputs": {
            name: inputs_record(absolute(spec), inputs.found[name])
            for name, spec in specs.items()
            if spec
        },
    }
    if args.init:
        model = run.table.name
        fingerprint["init"] = distributed.on_main(run.env, lambda: _init_id(args.init, model))
    return fingerprint


def plan_steps(run: Run) -> Plan:
    """The steps of an epoch and of the run, and each step's micro-batches, said once."""
    recipe, env, inputs = run.recipe, run.env, run.inputs
    steps_per_epoch = max(1, inputs.epoch_samples // recipe.batch_size)
    total_steps = steps_per_epoch * recipe.epochs
    if env.is_main and inputs.epoch_samples < recipe.batch_size:
        say(
            f"warning: an epoch of {inputs.epoch_samples} samples is smaller than one batch of "
            f"{recipe.batch_size}, so the {recipe.epochs} epochs make {total_steps} steps in "
            "all; for a small set pass a recipe made for it (--config) or --batch-size"
        )
    batch = recipe.batch_size // env.world
    pseudo_batch = math.ceil(recipe.unlabeled_ratio * batch) if inputs.found["pseudo"] else 0
    # The loaders cut each step in its micro-batches: each comes whole from one loader worker
    # as the step needs it, so none holds a whole step, and the workers share every step.
    splits = micro_splits(batch, pseudo_batch, recipe.micro_batch)
    if env.is_main:
        parts = len(splits)
        size = math.ceil((batch + pseudo_batch) / parts)
        why = (
            ": each holds at least one image of each kind, so no fewer"
            if recipe.micro_batch and size > recipe.micro_batch
            else ""
        )
        print(
            f"{batch} labeled + {pseudo_batch} pseudo-labeled images per step per process, "
            f"in {parts} micro-batch{'es' if parts > 1 else ''} of about {size} "
            f"(micro_batch {recipe.micro_batch}{why})"
        )
    return Plan(steps_per_epoch, total_steps, batch, pseudo_batch, splits)


def build_model(run: Run) -> Model:
    """The model with Noisy Student's model noise (dropout, stochastic depth), started from
    --init if given, its frozen layers, its EMA, and SGD with momentum at the peak LR."""
    args, recipe, env, model_name = run.args, run.recipe, run.env, run.table.name
    seed_everything(recipe.seed)
    model = create_model(
        model_name,
        recipe.num_classes,
        image_size=recipe.image_size,
        drop_rate=recipe.dropout,
        drop_path_rate=recipe.stochastic_depth,
    )
    if args.init:
        said = init_from(model, args.init, model_name)
        if env.is_main and said:
            print(said)
    elif recipe.freeze_through != NOTHING:
        raise UsageError(
            f"freeze_through {recipe.freeze_through} keeps layers as --init gives them: "
            "without --init they would stay at their random initialisation"
        )
    frozen = freeze_through(model, recipe.freeze_through)
    model = model.to(env.device, memory_format=memory_format(env.device))
    # cuDNN (CUDA only) times its kernels for each shape once and keeps the fastest, unless
    # the run asked for deterministic algorithms
    torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
    ema = ModelEma(model, recipe.ema_decay)
    if recipe.compile:
        model.compile()  # in place: the state dict, EMA and checkpoints keep their names
    # LR per 256 labeled images (the schedule follows resuming).
    optimizer = torch.optim.SGD(
        param_groups(model, recipe.weight_decay),
        lr=peak_lr(recipe.lr, recipe.batch_size),
        momentum=recipe.momentum,
    )
    return Model(model, ema, frozen, optimizer)


def resume(run: Run, built: Model) -> tuple[int, list[dict]]:
    """With --resume, the checkpoint's model, EMA and optimizer, and the log up to it:
    (epochs done, their records); else (0, [])."""
    args, recipe, model = run.args, run.recipe, run.table.name
    checkpoint = run_dir.load_checkpoint(args.out) if args.resume else None
    if checkpoint is None:
        return 0, []
    if checkpoint["model_name"] != model or checkpoint["num_classes"] != recipe.num_classes:
        raise UsageError(
            f"{args.out} holds a {checkpoint['model_name']} run with "
            f"{checkpoint['num_classes']} classes, not {model} with {recipe.num_classes}"
        )
    built.model.load_state_dict(checkpoint["model"])
    try:
        built.ema.load_state_dict(checkpoint["ema"])
    except RuntimeError:
        raise UsageError(
            f"{args.out} holds a checkpoint from an earlier version of the trainer, whose "
            "EMA it cannot continue; start a new run with another --out"
        ) from None
    built.optimizer.load_state_dict(checkpoint["optimizer"])
    start_epoch = checkpoint["epoch"]
    log = [r for r in run_dir.read_log(args.out) if r["epoch"] <= start_epoch]
    if run.env.is_main:
        print(f"resuming {args.out} after epoch {start_epoch} of {recipe.epochs}")
    return start_epoch, log


def train_epochs(
    run: Run, plan: Plan, built: Model, start_epoch: int, log: list[dict]
) -> list[dict]:
    """The epochs from `start_epoch` on, each evaluated on the validation shards (if any),
    logged and checkpointed; returns the run's log."""
    args, recipe, env, table = run.args, run.recipe, run.env, run.table
    # Schedule: linear warm-up, then cosine to zero at the last step of this run's epochs,
    # which are the last of `schedule_epochs` when the recipe says so.
    tail = max(recipe.schedule_epochs - recipe.epochs, 0)
    scheduler = lr_schedule(
        built.optimizer,
        round(recipe.warmup_epochs * plan.steps_per_epoch),
        plan.total_steps + tail * plan.steps_per_epoch,
        first_step=(tail + start_epoch) * plan.steps_per_epoch,
    )
    model = built.model
    if env.enabled:
        model = DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )
    normal, feed = Normalizer(table.mean, table.std, env.device), DeviceFeed(env.device)
    labeled, pseudo = build_loaders(run, plan, feed, start_epoch)
    info = run_info(table.name, recipe.num_classes, run.inputs.class_names, recipe.eval_size)
    val_loader = _val_loader(run, info)
    with progress_bar(
        total=plan.total_steps,
        initial=start_epoch * plan.steps_per_epoch,
        desc="train",
        unit="step",
        disable=not env.is_main,
    ) as bar:
        for epoch in range(start_epoch, recipe.epochs):
            seed_everything(recipe.seed, epoch, env.rank)
            stats = train_one_epoch(
                model,
                built.optimizer,
                scheduler,
                built.ema,
                on_device(mixed_parts(labeled, pseudo), feed),
                plan.steps_per_epoch,
                plan.splits,
                recipe,
                normal,
                world=env.world,
                bar=bar,
                frozen=built.frozen,
            )
            record = {
                "epoch": epoch + 1,
                "step": (epoch + 1) * plan.steps_per_epoch,
                **_mean_over_ranks(stats, env),
            }
            if val_loader is not None:
                metrics = evaluate(
                    built.ema.module, val_loader, env.device, info, env.enabled, source=args.val
                )
                record.update({f"val_{key}": value for key, value in metrics.items()})
            log.append(record)
            if env.is_main:
                _checkpoint(args.out, log, built, table.name, recipe.num_classes)
                tqdm.write(_summary(record))
    return log


def build_loaders(
    run: Run, plan: Plan, feed: DeviceFeed, start_epoch: int
) -> tuple[Iterator, Iterator | None]:
    """The labeled and pseudo-labeled streams, started once for the run: each epoch is one
    more pass over each, cut at the plan's micro-batch sizes."""
    recipe, env, inputs = run.recipe, run.env, run.inputs
    stream = partial(
        train_loader,
        rank=env.rank,
        world=env.world,
        seed=recipe.seed,
        workers=recipe.workers,
        shuffle_buffer=recipe.shuffle_buffer,
        pin_memory=feed.pin_memory,
    )
    preset = train_preset(run.table, recipe)
    labeled = stream(
        inputs.urls("labeled"),
        LabeledDecoder(preset, recipe.num_classes),
        [lab.stop - lab.start for lab, _ in plan.splits],
        first_epoch=start_epoch,
        stream=0,
    )
    if not plan.pseudo_batch:
        return labeled, None
    pseudo = stream(
        inputs.urls("pseudo"),
        PseudoDecoder(preset, recipe.num_classes, recipe.label_smoothing),
        [pse.stop - pse.start for _, pse in plan.splits],
        first_epoch=start_epoch,
        stream=1,
    )
    return labeled, pseudo


def _val_loader(run: Run, info: TeacherInfo) -> Iterable | None:
    recipe, env, inputs = run.recipe, run.env, run.inputs
    if not inputs.found["val"]:
        return None
    return eval_loader(
        inputs.urls("val"),
        eval_pixels(info),
        recipe.num_classes,
        recipe.eval_batch_size,
        rank=env.rank,
        world=env.world,
        workers=recipe.workers,
    )


def _checkpoint(out: str, log: list[dict], built: Model, model: str, num_classes: int) -> None:
    """The log first, the checkpoint last: a checkpoint always has its log, and a log ahead
    of the checkpoint (a kill in between) is cut back to it on --resume."""
    run_dir.write_log(out, log)
    run_dir.save_checkpoint(
        out,
        {
            "model": built.model.state_dict(),
            "ema": built.ema.state_dict(),
            "optimizer": built.optimizer.state_dict(),
            "epoch": log[-1]["epoch"],
            "model_name": model,
            "num_classes": num_classes,
        },
    )


def _init_source(init: str, model_name: str) -> tuple[str, str | None]:
    """(teacher, weights) for `load_teacher`: a run directory as it is, a file as weights
    of this run's model."""
    if is_run_dir(init):
        return init, None
    if is_dir(init):
        raise UsageError(
            f"--init {init} is a folder without model.json: give a training run's folder or a "
            "weights file"
        )
    return model_name, init


def _init_id(init: str, model_name: str) -> str:
    return describe_teacher(*_init_source(init, model_name))[0]


# A labeled set of this many shards or fewer is counted even when the recipe sets its epoch
# (a few listings), to warn when the recipe's epoch is another, larger set's, or a class has
# no labeled image.
SMALL_SET_SHARDS = 64
DWARFED = 100  # epoch_samples this many times the labeled set: a recipe for another set
# This share of the labeled samples or more with class ids beyond the classes: the classes
# given are not those the shards were written with (below it, damaged samples: dropped).
CONTRADICTED = 0.25


def _warn_if_dwarfed(epoch_samples: int, labeled: int) -> None:
    """One line when a recipe's `epoch_samples` (ImageNet's in configs/finetune.yaml)
    repeats a small labeled set many times an epoch."""
    if labeled and epoch_samples >= DWARFED * labeled:
        say(
            f"warning: epoch_samples {epoch_samples:,} is {epoch_samples / labeled:.0f} times "
            f"the {labeled:,} labeled samples: each epoch goes over them that often (a figure "
            "for a larger set?); pass --set epoch_samples=N for this one"
        )


def _warn_of_unlabeled_classes(classes: list[str] | int | None, counted: Counted) -> None:
    """One line naming the classes (of classes.json, or indices below num_classes) that no
    labeled image has: the run can learn them only from pseudo-labels, if any. Class ids
    beyond them are refused: the loaders would drop every such sample (unknown_class)."""
    if not counted.samples or classes is None:
        return
    names = classes if isinstance(classes, list) else [str(i) for i in range(classes)]
    beyond = sorted(c for c in counted.classes if c >= len(names))
    if beyond:
        lost = sum(counted.classes[c] for c in beyond)
        source = "classes.json names" if isinstance(classes, list) else "num_classes is"
        said = (
            f"{lost:,} of the {counted.samples:,} labeled samples have class ids up to "
            f"{beyond[-1]}, but {source} {len(names)} classes (0 to {len(names) - 1})"
        )
        if lost >= CONTRADICTED * counted.samples:  # not a few damaged samples: other classes
            raise UsageError(
                f"{said}: give the classes.json (or num_classes) these shards were written with"
            )
        say(f"warning: {said}: they are dropped (unknown_class) and counted every epoch")
    missing = [name for i, name in enumerate(names) if not counted.classes[i]]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        say(
            f"warning: {len(missing)} of the {len(names)} classes have no labeled image: "
            f"{shown} (learned from pseudo-labels alone, if any)"
        )


def init_from(model: nn.Module, init: str, model_name: str) -> str | None:
    """Load `init`'s weights into `model` (a run's starting point, before its EMA copy);
    a classifier of another class count is left as initialised, and said so."""
    source, info = load_teacher(*_init_source(init, model_name))
    if info.model_name != model_name:
        raise UsageError(f"--init {init} holds a {info.model_name}, not a {model_name}")
    state = source.state_dict()
    own = model.state_dict()
    head = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for key in head:
        del state[key]
    loaded = model.load_state_dict(state, strict=False)
    if set(loaded.missing_keys) != set(head) or loaded.unexpected_keys:
        raise UsageError(f"--init {init}: its weights do not fit a {model_name}")
    if head:
        return (
            f"--init {init}: its classifier has {info.num_classes} classes and this run "
            f"{own[head[0]].shape[0]}: the classifier ({', '.join(head)}) starts afresh"
        )
    return None


def _mean_over_ranks(stats: dict, env: distributed.Distributed) -> dict:
    """Losses and data-wait shares averaged over ranks, drops summed; images/s as it is (each
    rank counted the whole world)."""
    if not env.enabled:
        return stats
    keys = ("loss", "loss_labeled", "loss_pseudo", "data_wait")
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    if env.device.type == "cuda":
        values = values.to(env.device)
    distributed.all_reduce_sum(values)
    dropped = sum(
        (Counter(d) for d in distributed.gather_objects(stats["dropped"], env)), Counter()
    )
    return (
        stats
        | dict(zip(keys, (values.cpu() / env.world).tolist(), strict=True))
        | {"dropped": dict(sorted(dropped.items()))}
    )


def _summary(record: dict) -> str:
    parts = [f"epoch {record['epoch']}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.4g}"]
    parts.append(f"{record['images_per_s']:.0f} img/s")
    parts.append(f"data wait {record['data_wait']:.0%}")
    if "val_top1" in record:
        parts.append(f"val top-1 {100 * record['val_top1']:.2f}%")
    if record.get("dropped"):
        reasons = ", ".join(f"{n} {reason}" for reason, n in record["dropped"].items())
        parts.append(f"dropped {sum(record['dropped'].values())} samples ({reasons})")
    return ", ".join(parts)


def train(**options: object) -> dict:
    """Train a student and leave a run directory at `out` (config.yaml, log.jsonl,
    checkpoint.pt, and the EMA model as model.safetensors + model.json: the next round's
    teacher). Returns the last epoch's log record. Under torchrun, call it on every rank.

    `options` are the fields of `TrainArgs` (`labeled=`, `out=`, `config=`, ...) and recipe
    keys given directly (`model=`, `epochs=`, any key of `Recipe`), as on the command line.
    """
    args, recipe = resolve(options)
    created = not torch.distributed.is_initialized()
    env = distributed.init_distributed(args.device)
    given_back = False
    try:
        result = main(args, recipe, env)
    except UsageError:
        given_back = True  # refused before its first checkpoint, the run leaves no folder
        raise
    except RuntimeError as exc:
        if env.enabled and distributed.peer_lost(exc):
            said = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise PeerFailed(
                f"rank {env.rank} stopped: another rank of this job failed first (its own line "
                f"says why; torchrun's report follows): {said}"
            ) from exc
        raise
    finally:
        run_dir.release_claims(give_back=given_back)
    # Only after success: a failed rank must exit at once (torchrun then stops the others),
    # not wait in a teardown for ranks that are still waiting for it.
    if created:
        distributed.close_distributed()
    return result
