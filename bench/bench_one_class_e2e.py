"""Issue 11's one-class commands, end to end at 64 px on CPU: train -> PTQ -> export -> ONNX Runtime mAP.

A one-class dataset (BCCD's white blood cells: about one per image) is made in a temporary folder
from the shared BCCD copy, then the issue's four commands run as a user types them:

    python train.py --cfg gelan-t.yaml --data one.yaml --epochs 1 --imgsz 64 --device cpu
    python qat.py quantize --weights best.pt --data one.yaml --epochs 0 --imgsz 64 --calib-batches 1 --device cpu
    python export_qat.py --weights ptq.pt --include onnx --imgsz 64
    python val_trt.py --onnx ptq.onnx --data one.yaml --imgsz 64

Before the Q/DQ normalisation ONNX Runtime refused the exported file. Each step must exit 0; the
record keeps each step's seconds and the export's lint count. It runs minutes on a shared 2-core
machine, longer than a unit test should.

    nice python bench/bench_one_class_e2e.py  -> bench/results/one_class_e2e_steps_ok.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from bench.record import write_record  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402

BCCD = ROOT.parent / "shared" / "datasets" / "bccd" / "BCCD"
CLASS = "WBC"
SIZE = 96  # stored image width; the commands train and evaluate at 64


def one_class_dataset(root: Path, n_train: int = 24, n_val: int = 8) -> Path:
    """``root`` with shrunk BCCD images whose only labels are their white blood cells; returns the data yaml."""
    xmls = sorted((BCCD / "Annotations").glob("*.xml"))
    if not xmls:
        raise UserError(f"{BCCD}: no BCCD annotations (the shared datasets must sit beside the project)")
    kept = 0
    for xml in xmls:
        if kept == n_train + n_val:
            break
        tree = ET.parse(xml).getroot()
        w, h = (float(tree.find(f"size/{k}").text) for k in ("width", "height"))
        boxes = [[float(o.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
                 for o in tree.iter("object") if o.findtext("name") == CLASS]
        if not boxes:
            continue
        split = "train" if kept < n_train else "val"
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        image = Image.open(BCCD / "JPEGImages" / f"{xml.stem}.jpg").convert("RGB")
        image.resize((SIZE, round(SIZE * h / w))).save(root / "images" / split / f"{xml.stem}.jpg")
        lines = [f"0 {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                 for x1, y1, x2, y2 in boxes]
        (root / "labels" / split / f"{xml.stem}.txt").write_text("\n".join(lines) + "\n")
        kept += 1
    data = root / "one_class.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnc: 1\nnames: ['{CLASS}']\n")
    return data


def run_steps(work: Path) -> list[dict]:
    """The four commands in order; stops at the first that fails. Each step: name, seconds, exit code,
    and the last lines it printed."""
    data = one_class_dataset(work / "data")
    runs = work / "runs"
    steps = [
        ("train", ["train.py", "--cfg", "gelan-t.yaml", "--data", data, "--epochs", "1", "--imgsz", "64",
                   "--device", "cpu", "--batch-size", "8", "--workers", "0", "--project", runs / "train", "--name", "exp"]),
        ("quantize", ["qat.py", "quantize", "--weights", runs / "train/exp/weights/best.pt", "--data", data,
                      "--epochs", "0", "--imgsz", "64", "--calib-batches", "1", "--device", "cpu", "--batch-size", "8",
                      "--workers", "0", "--project", runs / "qat", "--name", "exp"]),
        ("export", ["export_qat.py", "--weights", runs / "qat/exp/weights/ptq.pt", "--include", "onnx", "--imgsz", "64"]),
        ("val_trt", ["val_trt.py", "--onnx", runs / "qat/exp/weights/ptq.onnx", "--data", data, "--imgsz", "64",
                     "--workers", "0", "--project", runs / "val_trt", "--name", "exp"]),
    ]
    done = []
    for name, args in steps:
        start = time.time()
        proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
        # what the command says it did (stdout), or why it stopped (stderr); progress bars and warnings go to stderr
        said = [line for line in (proc.stdout if proc.returncode == 0 else proc.stderr).splitlines() if line.strip()]
        tail = said[-4:]
        done.append({"step": name, "seconds": round(time.time() - start, 1), "exit_code": proc.returncode, "tail": tail})
        print(f"{name}: exit {proc.returncode}, {done[-1]['seconds']}s", *tail, sep="\n  ", flush=True)
        if proc.returncode != 0:
            break
    lint = runs / "qat/exp/weights/ptq.qdq_lint.json"
    export = next((s for s in done if s["step"] == "export"), None)
    if export is not None and lint.is_file():
        export["lint_findings"] = json.loads(lint.read_text())["total"]
    return done


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", type=Path, default=None)
    opt = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="one_class_") as tmp:
        steps = run_steps(Path(tmp))
    ok = sum(s["exit_code"] == 0 for s in steps)
    return write_record("one_class_e2e_steps_ok", ok, "of 4 steps exited 0", "gelan-t, nc=1, 64 px",
                        f"BCCD {CLASS} only (24 train / 8 val images)", extra={"steps": steps},
                        results_dir=opt.results_dir)


if __name__ == "__main__":
    run_cli(main)
