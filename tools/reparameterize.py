"""Convert a dual-branch YOLOv9 checkpoint into its single-branch GELAN inference form.

yolov9-X trains with an auxiliary branch (PGI) that inference does not need. The layers the main
prediction depends on form exactly the gelan-X network, so their weights are copied into a
gelan-X model, and the main head (``cv4``/``cv5``/``dfl2``) becomes its ``cv2``/``cv3``/``dfl``.
This is what upstream's reparameterization notebook does with hand-written index offsets; here
the mapping is derived from the layer graph, so every yolov9 config converts the same way.

Usage:  python tools/reparameterize.py --weights yolov9-c.pt [--cfg gelan-c.yaml] [--output out.pt]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from models.common import Silence  # noqa: E402
from models.loading import model_from_checkpoint  # noqa: E402
from models.yolo import DetectionModel, DualDDetect, DualDetect  # noqa: E402
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402


def main_branch_layers(model: DetectionModel) -> list[int]:
    """Indices of the layers the main (second) half of a dual head reads, directly or not."""
    head = model.model[-1]
    todo = list(head.f[head.nl:])
    needed: set[int] = set()
    while todo:
        i = todo.pop()
        if i in needed:
            continue
        needed.add(i)
        layer = model.model[i]
        sources = [layer.f] if isinstance(layer.f, int) else layer.f
        todo.extend(j for j in (i + s if s < 0 else s for s in sources) if j >= 0)  # j < 0: the image
    return sorted(needed)


def _body(layers) -> list[nn.Module]:
    # Silence only restarts a branch from the image; gelan-c has none where yolov9-c has one.
    return [m for m in layers if not isinstance(m, Silence)]


def reparameterize(dual: DetectionModel, cfg: str | Path | dict) -> DetectionModel:
    """A ``DetectionModel(cfg)`` holding ``dual``'s main-branch weights (same outputs as its main head)."""
    head = dual.model[-1]
    if not isinstance(head, (DualDetect, DualDDetect)):
        raise UserError(f"{getattr(dual, 'yaml_file', 'model')}: not a dual-branch model (head is {type(head).__name__})")
    gelan = DetectionModel(cfg, nc=head.nc)
    source = _body(dual.model[i] for i in main_branch_layers(dual))
    target = _body(gelan.model[:-1])
    kinds = lambda layers: [type(m).__name__ for m in layers]  # noqa: E731
    if kinds(source) != kinds(target):
        raise UserError(f"{cfg}: its layers {kinds(target)} do not match the main branch of "
                        f"{getattr(dual, 'yaml_file', 'the dual model')} {kinds(source)}")
    try:
        for src, dst in zip(source, target):
            dst.load_state_dict(src.state_dict())
        box, cls, dfl = head.branch(1)
        gelan_head = gelan.model[-1]
        gelan_head.cv2.load_state_dict(box.state_dict())
        gelan_head.cv3.load_state_dict(cls.state_dict())
        gelan_head.dfl.load_state_dict(dfl.state_dict())
    except RuntimeError as exc:
        raise UserError(f"{cfg}: layer sizes differ from the dual model ({str(exc).splitlines()[-1].strip()})") from None
    gelan.names = dual.names
    gelan.nc = head.nc
    return gelan.eval()


def default_gelan_cfg(dual: DetectionModel) -> str:
    """gelan-X.yaml for a model built from yolov9-X.yaml."""
    name = getattr(dual, "yaml_file", "")
    if not name.startswith("yolov9-"):
        raise UserError(f"cannot tell the gelan config for {name or 'this model'}; pass --cfg")
    return name.replace("yolov9-", "gelan-", 1)


def converted_checkpoint(model: DetectionModel) -> dict:
    """Upstream's converted-checkpoint dict: an fp16 model and nothing to resume from."""
    return {"model": model.half(), "optimizer": None, "best_fitness": None, "ema": None, "updates": None,
            "opt": None, "git": None, "date": None, "epoch": -1}


def max_output_difference(dual: DetectionModel, gelan: DetectionModel, imgsz: int = 160) -> float:
    """Largest |main-branch output - converted output| on one random image."""
    x = torch.rand(1, 3, imgsz, imgsz)
    with torch.no_grad():
        (_, main), _ = dual.eval()(x)
        converted, _ = gelan.eval()(x)
    return float((main - converted).abs().max())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="yolov9-X checkpoint (dual branch)")
    parser.add_argument("--cfg", default=None, help="gelan YAML to convert into (default: gelan-X for yolov9-X)")
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
    print(f"{output}: {gelan.yaml_file}, {sum(p.numel() for p in gelan.parameters()):,} parameters; "
          f"max |main-branch output - converted output| = {diff:.2e} (fp32, before fp16 storage)")
    return output


if __name__ == "__main__":
    run_cli(main)
