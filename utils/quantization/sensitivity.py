"""Per-layer quantization sensitivity: which layers cost accuracy in INT8, to keep them in float.

For every top-level layer that holds a quantized convolution, two PTQ variants of the same
calibrated model are evaluated: all layers INT8 except that one (what ``--skip-layers`` would
give) and only that one INT8. Each variant is rebuilt with ``prepare(skip_layers=...)`` and the
calibrated ranges, so it is exactly the model a skip would produce, tied scales included.
"""
from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path
from typing import Callable

import torch.nn as nn
from tqdm import tqdm

from models.quant_modules import QuantConv2d
from models.quantize import layer_of, load_amax_state, prepare
from models.quantize_rules import QuantPlan


def quantizable_layers(quantized: nn.Module) -> list[int]:
    """Top-level layers of a prepared model that contain an INT8 convolution."""
    return sorted({layer_of(n) for n, m in quantized.named_modules() if isinstance(m, QuantConv2d)} - {None})


def variant(float_model: nn.Module, plan: QuantPlan, amax: dict, skip: list[int]) -> nn.Module:
    """A copy of the fused float model quantized with ``skip`` layers left in float and the given ranges."""
    model = prepare(deepcopy(float_model), skip, plan)
    load_amax_state(model, amax)
    return model


def layer_sensitivity(float_model: nn.Module, plan: QuantPlan, amax: dict, layers: list[int],
                      evaluate: Callable[[nn.Module], float], ptq_map: float, measure_alone: bool = True,
                      progress: bool = True) -> list[dict]:
    """One row per layer, sorted by how much mAP keeping it in float gives back (largest first).
    ``measure_alone=False`` skips the only-this-layer-INT8 variant (half the evaluations)."""
    n = len(float_model.model)
    rows = []
    for i in tqdm(layers, desc="sensitivity", disable=not progress):
        without = evaluate(variant(float_model, plan, amax, [i]))
        alone = evaluate(variant(float_model, plan, amax, [j for j in range(n) if j != i])) if measure_alone \
            else float("nan")
        rows.append({"layer": i, "type": float_model.model[i].type.rsplit(".", 1)[-1],
                     "map_layer_float": without, "map_only_layer_int8": alone,
                     "gain_if_float": without - ptq_map})
    return sorted(rows, key=lambda r: r["gain_if_float"], reverse=True)


def most_sensitive(rows: list[dict], k: int) -> list[int]:
    """The ``k`` layers whose float version helps most (the ``--auto-skip`` choice)."""
    return sorted(r["layer"] for r in rows[:k])


def write_sensitivity(rows: list[dict], fp_map: float | None, ptq_map: float, save_dir: Path,
                      metric: str = "mAP50-95") -> list[Path]:
    """Sorted table (markdown, JSON) and a bar chart of the mAP each layer gives back in float;
    ``metric`` names the figure (a segmentation model's is box + mask mAP50-95)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    save_dir.mkdir(parents=True, exist_ok=True)
    md = ["# Per-layer quantization sensitivity", "",
          f"FP32 {metric}: {fp_map:.4f}" if fp_map is not None else f"FP32 {metric}: not evaluated",
          f"PTQ (all layers INT8) {metric}: {ptq_map:.4f}", "",
          f"| Rank | Layer | Type | {metric}, layer in float | {metric}, only layer INT8 | gain if float |",
          "|---|---|---|---|---|---|"]
    md += [f"| {k + 1} | {r['layer']} | {r['type']} | {r['map_layer_float']:.4f} | {r['map_only_layer_int8']:.4f} | "
           f"{r['gain_if_float']:+.4f} |" for k, r in enumerate(rows)]
    paths = [save_dir / "sensitivity.md", save_dir / "sensitivity.json", save_dir / "sensitivity.png"]
    paths[0].write_text("\n".join(md) + "\n")
    paths[1].write_text(json.dumps({"fp_map50_95": fp_map, "ptq_map50_95": ptq_map, "layers": rows}, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows)), 4))
    ax.bar([str(r["layer"]) for r in rows], [r["gain_if_float"] for r in rows], color="tab:blue")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("layer kept in float (sorted)")
    ax.set_ylabel(f"{metric} gained vs. full INT8")
    ax.set_title("Quantization sensitivity per layer")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths
