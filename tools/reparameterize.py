"""Convert a dual-branch YOLOv9 checkpoint into its single-branch GELAN inference form.

yolov9-X trains with an auxiliary branch (PGI) that inference does not need. The layers the main
prediction depends on form exactly the gelan-X network, so their weights are copied into a
gelan-X model, and the main head (``cv4``/``cv5``/``dfl2``) becomes its ``cv2``/``cv3``/``dfl``.
This is what upstream's reparameterization notebook does with hand-written index offsets; here
the mapping is derived from the layer graph, so every yolov9 config converts the same way.

Segmentation (yolov9-c-dseg, DualDSegment) converts the same way into a DSegment model; the main
mask towers and prototype layer (``cv7``/``proto2``) become ``cv4``/``proto``. Upstream ships no
single-branch YAML for it: gelan-c-dseg's prototype block has one bottleneck where the main
branch of yolov9-c-dseg has two, so the default target is then the main branch's own layers
(the config is derived from the dual YAML and stored in the converted model's ``yaml``).

Usage:  python tools/reparameterize.py --weights yolov9-c.pt [--cfg gelan-c.yaml] [--output out.pt]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from models.common import Silence  # noqa: E402
from models.config import load_config, resolve_config  # noqa: E402
from models.loading import model_from_checkpoint  # noqa: E402
from models.yolo import (  # noqa: E402
    DDetect,
    Detect,
    DetectionModel,
    DSegment,
    DualDDetect,
    DualDetect,
    DualDSegment,
    Model,
    SegmentHead,
)
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

# The head each dual head becomes: the same towers, one branch.
SINGLE_BRANCH_HEAD = {DualDetect: Detect, DualDDetect: DDetect, DualDSegment: DSegment}
MAIN = 1  # the branch inference keeps (upstream's order: auxiliary first)


def _sources(f: int | list[int], i: int) -> list[int]:
    """Absolute indices of the layers that layer ``i`` reads ('from' ``f``); -1 is the image."""
    return [i + j if j < 0 and i > 0 else j for j in (f if isinstance(f, list) else [f])]


def main_branch_layers(model: DetectionModel) -> list[int]:
    """Indices of the layers the main (second) branch of a dual head reads, directly or not."""
    head = model.model[-1]
    todo = [head.f[k] for k in head.branch_inputs(MAIN)]
    needed: set[int] = set()
    while todo:
        i = todo.pop()
        if i in needed:
            continue
        needed.add(i)
        todo.extend(j for j in _sources(model.model[i].f, i) if j >= 0)
    return sorted(needed)


def _body(layers) -> list[nn.Module]:
    # Silence only restarts a branch from the image; gelan-c has none where yolov9-c has one.
    return [m for m in layers if not isinstance(m, Silence)]


def _dual_head(dual: DetectionModel) -> DualDetect:
    head = dual.model[-1]
    if type(head) not in SINGLE_BRANCH_HEAD:
        raise UserError(f"{_name(dual)}: not a dual-branch model (head is {type(head).__name__})")
    return head


def _name(model: nn.Module) -> str:
    return getattr(model, "yaml_file", None) or "model"


def reparameterize(dual: DetectionModel, cfg: str | Path | dict) -> DetectionModel:
    """A ``Model(cfg)`` holding ``dual``'s main-branch weights (same outputs as its main head)."""
    head = _dual_head(dual)
    gelan = Model(cfg, nc=head.nc)
    cfg_name = getattr(gelan, "yaml_file", "the single-branch config")
    gelan_head = gelan.model[-1]
    if type(gelan_head) is not SINGLE_BRANCH_HEAD[type(head)]:
        raise UserError(f"{cfg_name}: head {type(gelan_head).__name__} is not the single-branch form of "
                        f"{_name(dual)}'s {type(head).__name__} ({SINGLE_BRANCH_HEAD[type(head)].__name__})")
    source = _body(dual.model[i] for i in main_branch_layers(dual))
    target = _body(gelan.model[:-1])
    kinds = lambda layers: [type(m).__name__ for m in layers]  # noqa: E731
    if kinds(source) != kinds(target):
        raise UserError(f"{cfg_name}: its layers {kinds(target)} do not match the main branch of "
                        f"{_name(dual)} {kinds(source)}")
    pairs = list(zip(source, target)) + list(zip(head.branch(MAIN), gelan_head.branch(0)))
    if isinstance(head, SegmentHead):
        pairs += zip(head.mask_branch(MAIN), gelan_head.mask_branch(0))
    try:
        for src, dst in pairs:
            dst.load_state_dict(src.state_dict())
    except RuntimeError as exc:
        raise UserError(f"{cfg_name}: layer sizes differ from the dual model ({str(exc).splitlines()[-1].strip()})"
                        ) from None
    gelan.names = dual.names
    gelan.nc = head.nc
    return gelan.eval()


def main_branch_config(dual: DetectionModel) -> dict:
    """The dual model's YAML reduced to its main branch: the layers ``main_branch_layers`` lists,
    renumbered, and the single-branch head reading the main inputs."""
    head = _dual_head(dual)
    keep = main_branch_layers(dual)
    new_index = {old: new for new, old in enumerate(keep)}
    rows = dual.yaml["backbone"] + dual.yaml["head"]

    def renumbered(f, old_i: int, new_i: int):
        out = [-1 if s == -1 or new_index[s] == new_i - 1 else new_index[s] for s in _sources(f, old_i)]
        return out if isinstance(f, list) else out[0]

    layers = [[renumbered(rows[i][0], i, new), *rows[i][1:]] for new, i in enumerate(keep)]
    head_row = [[new_index[head.f[k]] for k in head.branch_inputs(MAIN)], 1,
                SINGLE_BRANCH_HEAD[type(head)].__name__, rows[-1][3]]
    n_backbone = sum(i < len(dual.yaml["backbone"]) for i in keep)
    settings = {k: v for k, v in dual.yaml.items() if k not in ("backbone", "head")}
    return {**settings, "backbone": layers[:n_backbone], "head": layers[n_backbone:] + [head_row]}


def layer_graph(cfg: dict) -> tuple:
    """A config's layers with absolute sources and Silence layers dropped (a source that is one
    reads what it passes on), plus the settings that change the network: two configs that build
    the same network up to Silence compare equal."""
    alias: dict[int, object] = {-1: "image"}
    layers = []
    for i, (f, n, m, args) in enumerate(cfg["backbone"] + cfg["head"]):
        sources = [alias[j] for j in _sources(f, i)]
        if m == "Silence":
            alias[i] = sources[0]
            continue
        alias[i] = len(layers)
        layers.append((sources, n, m, args))
    return layers, *(cfg.get(k) for k in ("depth_multiple", "width_multiple", "activation"))


def default_gelan_cfg(dual: DetectionModel) -> str | dict:
    """gelan-X.yaml for a model built from yolov9-X.yaml when that is the main branch's network (as
    for every detection model), else the config derived from the main branch."""
    derived = main_branch_config(dual)
    name = getattr(dual, "yaml_file", "")
    if name.startswith("yolov9-"):
        with contextlib.suppress(UserError):  # no such bundled config: derive
            gelan = name.replace("yolov9-", "gelan-", 1)
            if layer_graph(load_config(resolve_config(gelan))) == layer_graph(derived):
                return gelan
    return derived


def converted_checkpoint(model: DetectionModel) -> dict:
    """Upstream's converted-checkpoint dict: an fp16 model and nothing to resume from."""
    return {"model": model.half(), "optimizer": None, "best_fitness": None, "ema": None, "updates": None,
            "opt": None, "git": None, "date": None, "epoch": -1}


def main_outputs(model: DetectionModel, x: torch.Tensor) -> list[torch.Tensor]:
    """What the main branch gives in eval: the prediction, and the prototypes of a segmentation model."""
    head = model.model[-1]
    with torch.no_grad():
        prediction, extra = model.eval()(x)
    if isinstance(prediction, list):  # dual detection heads decode both branches
        prediction = prediction[-1]
    return [prediction, extra[2]] if isinstance(head, SegmentHead) else [prediction]


def max_output_difference(dual: DetectionModel, gelan: DetectionModel, imgsz: int = 160) -> float:
    """Largest |main-branch output - converted output| on one random image."""
    x = torch.rand(1, 3, imgsz, imgsz)
    return max(float((a - b).abs().max()) for a, b in zip(main_outputs(dual, x), main_outputs(gelan, x)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="yolov9-X checkpoint (dual branch)")
    parser.add_argument("--cfg", default=None,
                        help="gelan YAML to convert into (default: gelan-X for yolov9-X, else the main branch)")
    parser.add_argument("--output", default=None, help="converted checkpoint (default: <weights>-converted.pt)")
    parser.add_argument("--unsafe-load", action="store_true", help="unpickle without the class allowlist")
    return parser


def main(argv: list[str] | None = None) -> Path:
    opt = build_parser().parse_args(argv)
    weights = Path(opt.weights)
    dual = model_from_checkpoint(load_checkpoint(weights, unsafe=opt.unsafe_load), weights)
    gelan = reparameterize(dual, opt.cfg or default_gelan_cfg(dual))
    diff = max_output_difference(dual, gelan)
    output = Path(opt.output) if opt.output else weights.with_name(f"{weights.stem}-converted.pt")
    save_checkpoint(converted_checkpoint(gelan), output)
    form = getattr(gelan, "yaml_file", None) or f"main branch of {_name(dual)}"
    print(f"{output}: {form}, {sum(p.numel() for p in gelan.parameters()):,} parameters; "
          f"max |main-branch output - converted output| = {diff:.2e} (fp32, before fp16 storage)")
    return output


if __name__ == "__main__":
    run_cli(main)
