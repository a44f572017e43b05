"""`pipeline models`: the family at a glance, sizes and costs measured from the code itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from rs_pseudolabel.teachers.registry import create_model, get_config, list_models


def _measure(name: str) -> tuple[float, float]:
    """(params in millions, GFLOPs at eval resolution) of a model built on the meta device:
    no memory is allocated and nothing is computed, so RS-420 costs a second, not minutes.

    A multiply-add counts as two FLOPs (FlopCounterMode's convention), which is also the
    ResNet-RS paper's: its table gives RS-50 at 160 px 4.6 GFLOPs and RS-420 at 320 px 128,
    as measured here; per multiply-add counts (timm's "GMACs") are half of these.
    """
    size = get_config(name).eval_size
    with torch.device("meta"):
        model = create_model(name).eval()
        image = torch.empty(1, 3, size, size)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        model(image)
    return params / 1e6, counter.get_total_flops() / 1e9


def models_table(names: Sequence[str] | None = None) -> list[dict]:
    """One row per model (all of them when `names` is None), recipe numbers from the table."""
    rows = []
    for name in names or list_models():
        cfg = get_config(name)
        params, gflops = _measure(name)
        rows.append(
            {
                "name": name,
                "layers": "-".join(map(str, cfg.stage_depths)) if cfg.family != "timm" else "-",
                "width": cfg.width if cfg.family != "timm" else "-",
                "params_m": round(params, 1),
                "train_size": cfg.train_size,
                "eval_size": cfg.eval_size,
                "gflops": round(gflops, 2),
                "dropout": cfg.drop_rate,
                "stochastic_depth": cfg.drop_path_rate,
                "randaugment": cfg.randaugment_magnitude,
                "micro_batch": cfg.micro_batch,
            }
        )
    return rows


HEADERS = {
    "name": "model",
    "layers": "blocks/stage",
    "width": "width",
    "params_m": "params (M)",
    "train_size": "train px",
    "eval_size": "eval px",
    "gflops": "GFLOPs",
    "dropout": "dropout",
    "stochastic_depth": "stoch. depth",
    "randaugment": "RandAugment",
    "micro_batch": "micro-batch",
}


def format_table(rows: list[dict]) -> str:
    """Aligned columns for a terminal: text left, numbers right."""
    cells = [list(HEADERS.values())] + [[str(row[key]) for key in HEADERS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]
    numeric = [not isinstance(rows[0][key], str) if rows else False for key in HEADERS]
    lines = [
        "  ".join(
            cell.rjust(w) if num and r else cell.ljust(w)
            for cell, w, num in zip(line, widths, numeric, strict=True)
        ).rstrip()
        for r, line in enumerate(cells)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


TIMM_NOTE = (
    "Any timm model is a model too, as timm:NAME (timm:convnext_atto, "
    "timm:tf_efficientnet_l2.ns_jft_in1k): built by timm with no download, its weights from "
    "--weights, its eval crop, mean and std from timm's pretrained config for NAME. "
    "python -c \"import timm; print(timm.list_models('*convnext*'))\" lists names."
)
