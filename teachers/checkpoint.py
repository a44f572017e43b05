"""The run directory: the one checkpoint format every stage after training reads.

A run directory holds `model.safetensors` (the weights to use: the EMA when training kept
one) and `model.json` (which model, its classes and how to preprocess for it), so a
trained student can be the next round's teacher by its path alone. Each file appears
atomically (temporary name, then rename), the weights first, so a fresh directory with a
`model.json` always has complete weights beside it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from safetensors.torch import save as save_safetensors
from torch import nn

from rs_pseudolabel.data.decode import RESAMPLING
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.storage import exists, join, open_read, read_json, write_bytes, write_json
from rs_pseudolabel.teachers.registry import MODELS, create_model, get_config, is_model_name
from rs_pseudolabel.teachers.weights import (
    WeightsError,
    classifier_classes,
    clean_state_dict,
    parse_weights,
    read_bytes,
)

# The exported model's files in a run directory, which every later stage reads (the trainer's
# own files, which `--resume` reads, are named in students/run_dir.py).
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


@dataclass(frozen=True)
class TeacherInfo:
    """What a consumer of a teacher needs besides the module: its identity for manifests and
    records, its classes, and the preprocessing it was trained for."""

    teacher_id: str  # model name @ first 8 hex of the weights' sha256: changes with the weights
    model_name: str
    num_classes: int
    class_names: list[str] | None
    eval_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    extra: dict = field(default_factory=dict)


def _teacher_id(model_name: str, weights: bytes) -> str:
    return f"{model_name}@{hashlib.sha256(weights).hexdigest()[:8]}"


def _streamed_sha256(url: str) -> str:
    digest = hashlib.sha256()
    try:
        with open_read(url) as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise WeightsError(f"file not found: {url}") from exc
    return digest.hexdigest()


def _info(model_name: str, weights: bytes, num_classes: int, meta: dict) -> TeacherInfo:
    """Preprocessing from the run's own record when there is one, else from the table."""
    cfg = get_config(model_name)
    return TeacherInfo(
        teacher_id=_teacher_id(model_name, weights),
        model_name=model_name,
        num_classes=num_classes,
        class_names=meta.get("class_names"),
        eval_size=meta.get("eval_size", cfg.eval_size),
        crop_pct=meta.get("crop_pct", cfg.crop_pct),
        interpolation=meta.get("interpolation", cfg.interpolation),
        mean=tuple(meta.get("mean", cfg.mean)),
        std=tuple(meta.get("std", cfg.std)),
        extra=meta.get("extra", {}),
    )


def run_info(
    model_name: str,
    num_classes: int,
    class_names: list[str] | None,
    eval_size: int | None = None,
    extra: dict | None = None,
    weights: bytes | None = None,
) -> TeacherInfo:
    """What a run directory of this model describes: the table's preprocessing at
    `eval_size` (default: the table's), the center crop keeping the table's padding there.
    `export_run` records it; a run still training is described the same way, named by its
    model until it has weights."""
    cfg = get_config(model_name)
    size = eval_size or cfg.eval_size
    meta = {"class_names": class_names, "extra": extra or {}}
    meta |= {"eval_size": size, "crop_pct": cfg.crop_pct_at(size)}
    info = _info(model_name, weights or b"", num_classes, meta)
    return info if weights is not None else replace(info, teacher_id=model_name)


def export_run(
    run_dir: str | Path,
    model: nn.Module,
    model_name: str,
    class_names: list[str] | None,
    extra: dict | None = None,
    eval_size: int | None = None,
) -> TeacherInfo:
    """Write `model` (pass the EMA copy when there is one) as a run directory, local or at an
    fsspec URL; returns what `load_teacher` will report for it. `eval_size`: the resolution
    its weights are to be evaluated and used for labeling at (default: the table's); the
    center crop keeps the table's padding there."""
    state = {
        key: value.detach().cpu().contiguous()
        for key, value in clean_state_dict(model.state_dict()).items()
    }
    num_classes = classifier_classes(state, get_config(model_name).classifier)
    if class_names is not None and len(class_names) != num_classes:
        raise UsageError(f"{len(class_names)} class names for a model with {num_classes} classes")
    weights = save_safetensors(state)
    info = run_info(model_name, num_classes, class_names, eval_size, extra, weights)
    run_dir = str(run_dir)
    write_bytes(join(run_dir, WEIGHTS_FILE), weights)
    meta = asdict(info)
    meta["model"] = meta.pop("model_name")
    del meta["teacher_id"]  # derived from the weights file on every load
    meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()  # the id, without the weights
    write_json(join(run_dir, META_FILE), meta)
    return info


def is_run_dir(path: str | Path) -> bool:
    return exists(join(str(path), META_FILE))


def _run_record(teacher: str, weights: str | Path | None) -> dict | None:
    """What a teacher names, checked once for describe and load: None for a model name
    (given with its weights), or the run directory's model.json; else one line saying why
    it is neither."""
    if is_model_name(teacher):
        get_config(teacher)  # a timm name timm does not know: said here, on the launcher
        if weights is None:
            raise UsageError(
                f"the teacher {teacher!r} is a model name, so it needs weights (--weights "
                "FILE: a .safetensors or .pth state dict); or pass a run directory instead"
            )
        return None
    meta = read_json(join(teacher, META_FILE)) if is_run_dir(teacher) else None
    if not isinstance(meta, dict):
        raise UsageError(
            f"teacher {teacher!r} is neither a model name ({', '.join(MODELS)}, timm:NAME) "
            f"nor a run directory holding {META_FILE}"
        )
    if weights is not None:
        raise UsageError(f"{teacher} is a run directory with its own weights; drop weights")
    wrong = _record_fault(meta)
    if wrong is not None:
        raise UsageError(
            f"{join(teacher, META_FILE)} was edited or damaged: {wrong}; put back the file "
            "the run exported (or export the run again)"
        )
    get_config(meta["model"])  # a model this version does not know: said in one line
    return meta


def _record_fault(meta: dict) -> str | None:
    """What in a run directory's model.json cannot be what `export_run` wrote, in words:
    a hand-edited field would otherwise surface in the workers as a tensor shape error."""

    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    def whole(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    checks = [
        ("model", lambda v: isinstance(v, str) and v, "a model name"),
        ("num_classes", whole, "a whole number above 0"),
        ("eval_size", whole, "a whole number of pixels above 0"),
        ("crop_pct", lambda v: number(v) and 0 < v <= 1, "a number in (0, 1]"),
        ("interpolation", lambda v: v in RESAMPLING, f"one of {', '.join(RESAMPLING)}"),
        ("mean", lambda v: isinstance(v, list) and len(v) == 3 and all(map(number, v)),
         "3 numbers, one per RGB channel"),
        ("std", lambda v: isinstance(v, list) and len(v) == 3
         and all(number(x) and x > 0 for x in v), "3 numbers above 0, one per RGB channel"),
        ("extra", lambda v: isinstance(v, dict), "a mapping"),
    ]  # fmt: skip
    for key, ok, what in checks:
        if key not in meta and key not in ("model", "num_classes"):
            continue  # older exports lack some: the table's value is used
        if not ok(meta.get(key)):
            return f"{key} must be {what}, not {json.dumps(meta.get(key))}"
    names = meta.get("class_names")
    if names is not None and (
        not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
        or len(names) != meta["num_classes"]
    ):
        return f"class_names must be {meta['num_classes']} names (num_classes), one per class"
    return None


def describe_teacher(
    teacher: str | Path, weights: str | Path | None = None
) -> tuple[str, list[str] | None]:
    """(teacher id, class names) without loading the model, for the machine that launches a
    job: a run directory's model.json records both; a weights file given with a model name
    is hashed as a stream. Fails like `load_teacher` on a teacher that names nothing."""
    teacher = str(teacher)
    meta = _run_record(teacher, weights)
    if meta is None:
        return f"{teacher}@{_streamed_sha256(str(weights))[:8]}", None
    digest = meta.get("weights_sha256") or _streamed_sha256(join(teacher, WEIGHTS_FILE))
    return f"{meta['model']}@{digest[:8]}", meta.get("class_names")


def load_teacher(
    teacher: str | Path, weights: str | Path | None = None, device: str = "cpu"
) -> tuple[nn.Module, TeacherInfo]:
    """A model ready for inference (eval mode, on `device`) and its description.

    `teacher` is a model name from the table, with `weights` (timm-layout or project state
    dict), or a run directory written by `export_run`, which carries its own weights.
    """
    teacher = str(teacher)
    meta = _run_record(teacher, weights)
    if meta is None:
        data = read_bytes(weights)
        state = parse_weights(data, str(weights))
        classes = classifier_classes(state, get_config(teacher).classifier)
        info = _info(teacher, data, classes, {})
    else:
        data = read_bytes(join(teacher, WEIGHTS_FILE))
        recorded, found = meta.get("weights_sha256"), hashlib.sha256(data).hexdigest()
        if recorded and recorded != found:
            raise UsageError(
                f"{join(teacher, WEIGHTS_FILE)} is not the file {META_FILE} records (sha256 "
                f"{recorded[:8]}, found {found[:8]}): the run directory was changed after its "
                "export; put its own weights back, or export the new ones as a run directory"
            )
        state = parse_weights(data, join(teacher, WEIGHTS_FILE))
        info = _info(meta["model"], data, meta["num_classes"], meta)
    # Built at the size it was trained at, for architectures whose shapes depend on it.
    size = info.extra.get("recipe", {}).get("image_size")
    model = create_model(info.model_name, info.num_classes, weights=state, image_size=size)
    return model.to(device).eval(), info
