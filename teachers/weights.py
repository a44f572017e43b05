"""Reading state dicts safely, and fitting them to a model with an error that says what is wrong.

Only data is ever loaded: safetensors, or torch pickles through `weights_only=True`, which
refuses any pickle that would run code. Training checkpoints (timm's, torchvision's
reference scripts', DDP-wrapped ones) are unwrapped to the model weights, EMA first, because
the EMA is the model that gets evaluated and exported.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from rs_pseudolabel.data import storage
from rs_pseudolabel.data.errors import UsageError

StateDict = dict[str, torch.Tensor]
WeightsSource = str | Path | Mapping[str, torch.Tensor]

# Keys under which training checkpoints keep the model, best first: the EMA is the model to use.
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


class WeightsError(UsageError):
    """Weights that cannot be read, are unsafe, or do not fit the model."""


def read_bytes(url: str | Path) -> bytes:
    """A whole file, local or at any fsspec URL (gs://, s3://), so remote Beam workers can
    load the teacher from where the launcher points them."""
    try:
        return storage.read_bytes(str(url))
    except FileNotFoundError as exc:
        raise WeightsError(f"file not found: {url}") from exc


def parse_weights(data: bytes, name: str) -> StateDict:
    """The model state dict held in a file's bytes; `name` picks the format by its suffix."""
    if name.endswith(".safetensors"):
        try:
            return clean_state_dict(load_safetensors(data), name)
        except SafetensorError as exc:
            raise WeightsError(f"{name} is not a readable safetensors file: {exc}") from exc
    if not name.endswith(TORCH_SUFFIXES):
        raise WeightsError(f"{name}: weights must be .safetensors, .pth, .pt or .bin")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{name} was refused by torch's weights-only loader ({unpickler_reason(exc)}): "
            "only tensors and plain containers are loaded, since anything else could run "
            "code. Re-save the state dict alone, or as .safetensors"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise WeightsError(f"{name} is not a readable torch checkpoint: {exc}") from exc
    return clean_state_dict(obj, name)


def unpickler_reason(exc: Exception) -> str:
    """The one line of torch's long message that says what was found (a global, an opcode),
    without its advice to allow-list globals, which is what we must not do."""
    text = str(exc)
    reason = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
    return reason.split(". Please", 1)[0]


def clean_state_dict(obj: object, name: str = "weights") -> StateDict:
    """Unwrap a training checkpoint to its (EMA) weights and strip DDP's `module.` prefix."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{name} holds no state dict")
    state = {}
    for key, value in obj.items():
        if key == "n_averaged":  # torch.optim.swa_utils.AveragedModel's counter, not a weight
            continue
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{name}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key.removeprefix("module.")] = value
    return state


def read_weights(source: WeightsSource) -> StateDict:
    """A state dict from a file path/URL (.safetensors, .pth, .pt) or an in-memory mapping."""
    if isinstance(source, Mapping):
        return clean_state_dict(source)
    return parse_weights(read_bytes(source), str(source))


def classifier_classes(state: StateDict, classifier: str = "fc") -> int:
    """How many classes the weights were trained for, from the shape of the classifier
    module's weight (`fc` in ResNets, `head.fc` in a ConvNeXt, `head` in a ViT)."""
    key = f"{classifier}.weight"
    if key not in state:
        raise WeightsError(f"weights have no classifier tensor {key!r}")
    return state[key].shape[0]


def apply_weights(model: nn.Module, state: StateDict, model_name: str = "the model") -> None:
    """Load `state` into `model` strictly, after naming the first tensor that does not fit.

    PyTorch's own message lists every mismatch of a 400-block model at once; the first one
    (a missing or unexpected tensor, or two shapes) is what a user needs to see.
    """
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):  # BatchNorm fills it in when absent
                continue
            raise WeightsError(f"weights do not fit {model_name}: tensor {key!r} is missing")
        if state[key].shape != tensor.shape:
            raise WeightsError(
                f"weights do not fit {model_name}: tensor {key!r} has shape "
                f"{tuple(state[key].shape)} in the weights but {tuple(tensor.shape)} in the model"
            )
    unexpected = next((key for key in state if key not in expected), None)
    if unexpected is not None:
        raise WeightsError(
            f"weights do not fit {model_name}: unexpected tensor {unexpected!r} "
            "(weights of a deeper or different model?)"
        )
    model.load_state_dict(state, strict=True)
