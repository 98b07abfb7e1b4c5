"""Evaluate a detection or segmentation model on a split of a data yaml: the mAP table, results.json/.md, plots.

val.py is this function's command line; the trainer and the QAT pipeline call ``run(model=...,
dataloader=...)`` after each epoch and get the same ``EvalResult`` the command prints. The model's
head decides the task: a segmentation model is scored on boxes and masks, with the mask plots.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from models.loading import attempt_load
from utils.data.config import load_data_config, require_split
from utils.data.dataset import check_task, create_dataloader, model_task
from utils.errors import UserError
from utils.evaluation.coco import (
    category_ids,
    coco_evaluate,
    ground_truth_to_coco,
    image_ids,
    mask_rles,
    predictions_to_coco,
)
from utils.evaluation.evaluator import EvalArtifacts, EvalResult, evaluate
from utils.options import EVAL_SPLITS, check_flags, check_imgsz
from utils.paths import ROOT, increment_path
from utils.torch_utils import de_parallel, select_device


def _class_names(data: dict) -> list[str]:
    """The data yaml's names: a model built from a bare YAML only knows '0', '1', ... and the
    class count has already been checked against the data."""
    names = data["names"]
    return list(names.values()) if isinstance(names, dict) else list(names)


def _check_model_matches_data(model, data: dict, weights) -> None:
    model_nc = getattr(de_parallel(model), "nc", None)
    if model_nc is not None and int(model_nc) != int(data["nc"]):
        raise UserError(f"{weights}: model has {model_nc} classes but the data yaml has {data['nc']}; "
                        "pass the --data it was trained on (or --single-cls)")


def _build_dataloader(data: dict, task: str, imgsz: int, batch_size: int, stride: int, workers: int,
                      model_kind: str, weights) -> object:
    """The split's loader, after checking that its labels fit the model (boxes or polygons)."""
    if task not in EVAL_SPLITS:
        raise UserError(f"--task {task}: expected one of {', '.join(EVAL_SPLITS)}")
    check_imgsz(imgsz, stride)
    # rect batches with half-stride padding, as upstream validates: least padding, same mAP.
    loader, dataset = create_dataloader(require_split(data, task), imgsz, batch_size, stride, rect=True, pad=0.5,
                                        workers=workers, prefix=f"{task}: ", nc=data["nc"], task=model_kind)
    check_task(dataset, str(weights), model_kind)
    return loader


def coco_json(artifacts: EvalArtifacts, data: dict, names: list[str], single_cls: bool) -> tuple[list[dict], dict]:
    """COCO result list and ground-truth dataset of an ``evaluate(..., keep_boxes=True)`` pass; with masks,
    predictions carry RLEs (original resolution) and the truth its polygons."""
    cat_ids = [0] if single_cls else category_ids(data)
    img_ids = image_ids(artifacts.files)
    segmented = artifacts.mask_ap is not None
    rles = [mask_rles([m.full(*hw) for m in masks]) for masks, hw in zip(artifacts.masks, artifacts.shapes)] \
        if segmented else None
    gt = ground_truth_to_coco(artifacts.labels, artifacts.shapes, img_ids, cat_ids,
                              ["all-classes"] if single_cls else names, artifacts.files,
                              artifacts.polygons if segmented else None)
    return predictions_to_coco(artifacts.detections, img_ids, cat_ids, rles), gt


def _save_coco_json(artifacts: EvalArtifacts, data: dict, names: list[str], save_dir: Path, stem: str,
                    single_cls: bool) -> tuple[Path, Path]:
    """``coco_json``'s pair written as {stem}_predictions.json and ground_truth.json."""
    predictions, gt = coco_json(artifacts, data, names, single_cls)
    pred_path, gt_path = save_dir / f"{stem}_predictions.json", save_dir / "ground_truth.json"
    pred_path.write_text(json.dumps(predictions))
    gt_path.write_text(json.dumps(gt))
    return pred_path, gt_path


def _coco_figures(gt_path: Path, pred_path: Path, segmented: bool) -> dict:
    """pycocotools' box figures, and for segmentation its mask figures as 'mask_map50_95' / 'mask_map50'."""
    figures = {"backend": "pycocotools", **coco_evaluate(gt_path, pred_path), "predictions": str(pred_path)}
    if segmented:
        segm = coco_evaluate(gt_path, pred_path, iou_type="segm")
        figures.update(mask_map50_95=segm["map50_95"], mask_map50=segm["map50"], mask_stats=segm["stats"])
    return figures


def _write_report(result: EvalResult, save_dir: Path) -> None:
    (save_dir / "results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (save_dir / "results.md").write_text(result.markdown())


def run(data, weights=None, batch_size: int = 32, imgsz: int = 640, conf_thres: float = 0.001,
        iou_thres: float = 0.7, max_det: int = 300, task: str = "val", device="", workers: int = 8,
        single_cls: bool = False, half: bool = False, project=ROOT / "runs/val", name: str = "exp",
        exist_ok: bool = False, save_json: bool = False, postprocess: str = "nms", model=None, dataloader=None,
        save_dir=None, plots: bool = True, compute_loss=None, verbose: bool = False,
        unsafe_load: bool = False) -> EvalResult:
    """Evaluate ``weights`` (or an in-memory ``model``) on ``data[task]``; print, save and return the result.

    With ``model`` given (training, QAT) the model is used as is on its own device, put in eval
    mode for the pass and given back in the mode it came in; files are written only where
    ``save_dir`` says. Standalone runs write to a fresh ``project/name`` folder, made once the model
    and the images have loaded.
    """
    check_flags(locals())  # the parameters are val.py's flags
    data = data if isinstance(data, dict) else load_data_config(data)
    training = model is not None
    if training:
        device = next(model.parameters()).device
    else:
        if weights is None:
            raise UserError("val.py: pass --weights (a .pt checkpoint)")
        device = select_device(device)
        model = attempt_load(weights, device=device, fuse=True, unsafe=unsafe_load)
        if not single_cls:
            _check_model_matches_data(model, data, weights)
    half = half and device.type == "cuda"  # CPU kernels for fp16 convolutions are missing or slow
    names = _class_names(data)
    if dataloader is None:
        stride = max(int(de_parallel(model).stride.max()), 32)
        dataloader = _build_dataloader(data, task, imgsz, batch_size, stride, workers, model_task(model),
                                       weights if weights is not None else "the model")
    if not training:
        save_dir = save_dir or increment_path(Path(project) / name, exist_ok=exist_ok)
    save_dir = Path(save_dir) if save_dir else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)

    was_training = model.training
    # A caller's model is evaluated in FP16 through a copy: halving it in place and back would
    # round its (EMA / QAT) weights to FP16 for good.
    net = (copy.deepcopy(model) if training else model).half() if half else model
    net.eval()
    try:
        result, artifacts = evaluate(net, dataloader, names, device=device, half=half, conf_thres=conf_thres,
                                     iou_thres=iou_thres, max_det=max_det, postprocess=postprocess,
                                     single_cls=single_cls, compute_loss=compute_loss,
                                     keep_boxes=save_json and save_dir is not None,
                                     mask_plots=plots and save_dir is not None)
    finally:
        model.train(was_training)

    print(result.table(per_class=(verbose or (len(names) < 50 and not training)) and len(names) > 1))
    if not training:
        s = result.speed_ms
        print(f"Speed: {s['pre']:.1f}ms pre-process, {s['inference']:.1f}ms inference, {s['nms']:.1f}ms NMS "
              f"per image at batch-size {batch_size}, imgsz {imgsz}")
    if save_dir and save_json:
        stem = Path(weights).stem if weights else "model"
        pred_path, gt_path = _save_coco_json(artifacts, data, names, save_dir, stem, single_cls)
        result.coco = _coco_figures(gt_path, pred_path, artifacts.mask_ap is not None)
        masks = (f"; masks mAP50-95 {result.coco['mask_map50_95']:.4f}, mAP50 {result.coco['mask_map50']:.4f}"
                 if "mask_map50" in result.coco else "")
        print(f"pycocotools: mAP50-95 {result.coco['map50_95']:.4f}, mAP50 {result.coco['map50']:.4f}{masks} "
              f"({pred_path})")
    if save_dir and plots:
        # here, not at the top: matplotlib costs a second or two of start-up that runs without plots never use
        from utils.evaluation.plots import plot_confusion_matrix, plot_mask_samples, plot_pr_curve

        plot_names = ["all-classes"] if single_cls else names
        plot_pr_curve(artifacts.ap, names, save_dir / "PR_curve.png")
        plot_confusion_matrix(artifacts.confusion, plot_names, save_dir / "confusion_matrix.png")
        if artifacts.mask_ap is not None:
            plot_pr_curve(artifacts.mask_ap, names, save_dir / "MaskPR_curve.png")
        if artifacts.mask_samples:
            plot_mask_samples(artifacts.mask_samples, plot_names, save_dir / "val_masks_labels.png", predictions=False)
            plot_mask_samples(artifacts.mask_samples, plot_names, save_dir / "val_masks_pred.png", predictions=True)
    if save_dir and not training:
        _write_report(result, save_dir)
        print(f"Results saved to {save_dir}")
    return result
