"""YOLO-format detection and segmentation datasets and the DataLoader that batches them.

A dataset is a set of images found from folders or ``.txt`` lists; each image's labels sit at
the same path with the last ``images`` folder replaced by ``labels`` and a ``.txt`` suffix
(upstream's rule, so existing datasets work unchanged). Images and labels are checked once
(``utils.data.label_check``) and the result is cached (``utils.data.label_cache``). Batches have
upstream's layout so the loss, the evaluator and QAT calibration can consume them directly.

Segmentation (``task='segment'``) needs polygon labels. Each instance's polygon goes through the
same geometric augmentations as its box and is rasterised at the end, at ``1 / mask_ratio`` of the
input size (the prototype resolution of every YOLOv9 segmentation head for ``mask_ratio`` 4). Every
instance gets its own mask (upstream's ``--no-overlap``): where instances overlap, each keeps its
whole outline, rather than one mask image per picture in which the smaller instance takes the
shared pixels, which upstream's own flag help says costs mAP. The batch then holds one mask per
target row, in the same order.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from utils.boxes import xywhn2xyxy, xyxy2xywhn
from utils.data.augment import augment_hsv, letterbox, mixup, mosaic4, random_flip, random_perspective
from utils.data.config import AUGMENT_KEYS, load_hyp
from utils.data.epoch_loader import EpochBatchSampler, EpochLoader, SampleKey
from utils.data.label_cache import load_or_scan
from utils.data.label_check import IMG_FORMATS
from utils.data.polygons import rasterize
from utils.errors import UserError
from utils.options import MIN_STRIDE
from utils.paths import ROOT

LOGGER = logging.getLogger("yolov9.data")
DEFAULT_HYP = ROOT / "data" / "hyps" / "hyp.scratch-high.yaml"
NO_EPOCH_LIMIT = 2 ** 62
TASKS = ("detect", "segment")
MASK_RATIO = 4  # input pixels per mask pixel: the prototypes' stride in every YOLOv9 segmentation head


def img2label_paths(im_files: list[str]) -> list[str]:
    """Label file of each image: last ``/images/`` -> ``/labels/``, suffix -> ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return [sb.join(f.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt" for f in im_files]


def list_image_files(source: str | Path | list, prefix: str = "") -> list[str]:
    """Image paths from a folder (searched recursively), a ``.txt`` list, or a list of those.

    Relative lines in a list file are taken relative to the list file's folder. Paths are not
    resolved, so a symlinked ``images/`` tree keeps finding its own ``labels/`` tree.
    """
    files = []
    for src in source if isinstance(source, (list, tuple)) else [source]:
        p = Path(src)
        if p.is_dir():
            files += [os.path.join(d, f) for d, _, names in os.walk(p, followlinks=True) for f in names]
        elif p.is_file():
            lines = [x.strip() for x in p.read_text(encoding="utf-8", errors="replace").splitlines()]
            files += [os.path.normpath(os.path.join(p.parent, x)) for x in lines if x]
        else:
            raise UserError(f"{prefix}{p}: image folder or list file does not exist")
    images = [f for f in files if f.rsplit(".", 1)[-1].lower() in IMG_FORMATS]
    unique = sorted(set(images))
    if len(unique) < len(images):
        LOGGER.warning(f"{prefix}WARNING {source}: {len(images) - len(unique)} image path(s) listed twice, used once")
    if not unique:
        raise UserError(f"{prefix}{source}: no images found (formats: {', '.join(IMG_FORMATS)})")
    return unique


class YoloDataset(Dataset):
    """Images with checked YOLO labels; training augmentation or letterbox-only validation.

    ``labels`` is a list of (n, 5) float32 arrays [cls, x, y, w, h] normalised to each image,
    ``segments`` a list of each image's normalised polygons (empty for box labels), ``shapes`` an
    (N, 2) array of original (width, height); all follow the order of ``im_files``.
    ``fixed_hw`` letterboxes every image to exactly that (h, w) instead of ``img_size`` square: the
    input of an exported model, which may be non-square (validation only).

    Items are ``(image, targets, path, shapes)`` for ``task='detect'``; ``task='segment'`` adds
    ``masks`` (n, h / mask_ratio, w / mask_ratio) uint8, one per target row, and ``polygons``, the
    list of each instance's (k, 2) polygon in input pixels (what the evaluator maps back to the
    original image to rasterise ground truth there).
    """

    def __init__(self, path: str | Path | list, img_size: int = 640, batch_size: int = 16, augment: bool = False,
                 hyp: dict | str | Path | None = None, rect: bool = False, stride: int = 32, pad: float = 0.0,
                 prefix: str = "", nc: int | None = None, fixed_hw: tuple[int, int] | None = None, seed: int = 0,
                 task: str = "detect", mask_ratio: int = MASK_RATIO):
        if fixed_hw is not None and (augment or rect):
            raise ValueError("fixed_hw is a validation input size: it takes neither augment nor rect")
        if task not in TASKS:
            raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
        if MIN_STRIDE % mask_ratio:
            raise UserError(f"--mask-ratio {mask_ratio}: must divide {MIN_STRIDE}, as every image side does")
        self.task = task
        self.mask_ratio = mask_ratio
        self.img_size = img_size
        self.seed = seed
        self.fit_hw = tuple(fixed_hw) if fixed_hw is not None else (img_size, img_size)
        self.augment = augment
        self.hyp = _training_hyp(hyp) if augment else hyp
        self.rect = rect
        self.stride = stride
        self.mosaic_border = (-img_size // 2, -img_size // 2)

        self.source = str(path) if not isinstance(path, (list, tuple)) else ", ".join(map(str, path))
        im_files = list_image_files(path, prefix)
        label_files = img2label_paths(im_files)
        single_list = not isinstance(path, (list, tuple)) and Path(path).is_file()
        self.cache_path = (Path(path) if single_list else Path(label_files[0]).parent).with_suffix(".cache")
        self.scan, self.cache_reused = load_or_scan(self.cache_path, im_files, label_files, nc, prefix)
        if not self.scan.im_files:
            raise UserError(f"{prefix}{path}: no usable images ({self.scan.summary()})")
        if augment and not any(len(lb) for lb in self.scan.labels):
            raise UserError(f"{prefix}{path}: no labels in any image, nothing to train on")

        self.im_files = list(self.scan.im_files)
        self.labels = list(self.scan.labels)
        self.segments = list(self.scan.segments)
        self.shapes = np.asarray(self.scan.shapes)
        self.label_kind = _label_kind(self.scan, f"{prefix}{path}", task)
        n = len(self.im_files)
        self.indices = range(n)
        self.batch = np.arange(n) // batch_size
        if rect:
            self._make_rect_batches(batch_size, pad)
        self.label_files = img2label_paths(self.im_files)
        # Kept in shared memory so that switching mosaic off, or the epoch, reaches persistent worker processes.
        # _mosaic: mosaic on, and for samples of which epochs (an epoch below the second value).
        self._mosaic = torch.tensor([int(augment and not rect), NO_EPOCH_LIMIT]).share_memory_()
        self._epoch = torch.tensor(-1).share_memory_()  # -1: set_epoch never called

    @property
    def mosaic(self) -> bool:
        return bool(self._mosaic[0])

    @mosaic.setter
    def mosaic(self, on: bool) -> None:
        self._mosaic[0] = int(bool(on))

    def close_mosaic(self, from_epoch: int | None = None) -> None:
        """Stop mosaic for the final epochs, so the model ends on images as they will be seen: now, or
        for every sample drawn for ``from_epoch`` or later (set before training, this also holds for
        the batches an ``EpochLoader`` prepares ahead of the epoch)."""
        if from_epoch is None:
            self.mosaic = False
        else:
            self._mosaic[1] = from_epoch

    def augmentation_state(self) -> tuple[int, int]:
        """What decides whether a sample is a mosaic; prepared samples are void once it changes."""
        return tuple(self._mosaic.tolist())

    def _mosaic_for(self, epoch: int) -> bool:
        on, until = self._mosaic.tolist()
        return bool(on) and epoch < until

    def _make_rect_batches(self, batch_size: int, pad: float) -> None:
        """Sort by aspect ratio and give each batch the smallest stride-multiple shape that fits it."""
        aspect = self.shapes[:, 1] / self.shapes[:, 0]  # h / w
        order = aspect.argsort()
        self.im_files = [self.im_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.segments = [self.segments[i] for i in order]
        self.shapes = self.shapes[order]
        aspect = aspect[order]
        shapes = []
        for b in range(self.batch[-1] + 1):
            ar = aspect[self.batch == b]
            lo, hi = ar.min(), ar.max()
            shapes.append([hi, 1] if hi < 1 else [1, 1 / lo] if lo > 1 else [1, 1])  # (h, w) relative to img_size
        self.batch_shapes = np.ceil(np.array(shapes) * self.img_size / self.stride + pad).astype(int) * self.stride

    def set_epoch(self, epoch: int) -> None:
        """Draw each image's augmentations from (seed, epoch, image index) from now on.

        A persistent worker's random state would otherwise run on from the epochs before, and a
        resumed run starts fresh workers: its epoch would differ from the uninterrupted run's.
        Seeding per image also makes the draws independent of the worker count and of the order.
        """
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.im_files)

    def __getitem__(self, index: int | SampleKey):
        if isinstance(index, SampleKey):  # drawn ahead of its epoch by an EpochLoader: the key says which
            epoch, index = index.epoch, index.index
        else:
            epoch = int(self._epoch)
        if epoch < 0 or not self.augment:
            return self._load_item(index, epoch)
        with _seeded_draws(self.seed, epoch, index):
            return self._load_item(index, epoch)

    def _load_item(self, index: int, epoch: int):
        hyp = self.hyp
        segment = self.task == "segment"
        if self._mosaic_for(epoch) and random.random() < hyp["mosaic"]:
            img, labels, segments = self.load_mosaic(index)
            shapes = None
            if random.random() < hyp["mixup"]:
                img, labels, segments = mixup(img, labels, segments, *self.load_mosaic(random.randrange(len(self))))
        else:
            img, (h0, w0) = self.load_image(index)
            hr, wr = img.shape[:2]
            shape = self.batch_shapes[self.batch[index]] if self.rect else self.fit_hw
            img, (gain_w, gain_h), (padw, padh) = letterbox(img, shape, auto=False, scaleup=self.augment)
            h, w = round(hr * gain_h), round(wr * gain_w)  # image size inside the padding
            shapes = (h0, w0), ((h / h0, w / w0), (padw, padh))
            labels = self.labels[index].copy()
            if len(labels):
                labels[:, 1:] = xywhn2xyxy(labels[:, 1:], w, h, padw, padh)
            segments = [p * (w, h) + (padw, padh) for p in self.segments[index]] if segment else None
            if self.augment:
                img, labels, segments = random_perspective(
                    img, labels, segments, degrees=hyp["degrees"], translate=hyp["translate"],
                    scale=hyp["scale"], shear=hyp["shear"], perspective=hyp["perspective"])
        if len(labels):
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=img.shape[1], h=img.shape[0], clip=True, eps=1e-3)
        if self.augment:
            augment_hsv(img, hgain=hyp["hsv_h"], sgain=hyp["hsv_s"], vgain=hyp["hsv_v"])
            img, labels, segments = random_flip(img, labels, segments, flipud=hyp["flipud"], fliplr=hyp["fliplr"])

        targets = torch.zeros((len(labels), 6))
        if len(labels):
            targets[:, 1:] = torch.from_numpy(labels)
        item = (torch.from_numpy(np.ascontiguousarray(img.transpose((2, 0, 1))[::-1])),  # HWC BGR -> CHW RGB
                targets, self.im_files[index], shapes)
        if not segment:
            return item
        polygons = [np.asarray(p, dtype=np.float32) for p in segments]
        r = self.mask_ratio
        masks = rasterize(polygons, img.shape[0] // r, img.shape[1] // r, scale=1 / r)
        return (*item, torch.from_numpy(masks), polygons)

    def cache_images(self) -> int:
        """Decode and resize every image once into RAM (``train.py --cache ram``); returns the bytes held.

        Call before the first batch: the loader's workers start then and inherit the cache.
        """
        images = [self.load_image(i) for i in tqdm(range(len(self)), desc="caching images", leave=False)]
        self._cached = images
        return sum(im.nbytes for im, _ in images)

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int]]:
        """BGR image resized to fit ``fit_hw`` (square: its longest side is ``img_size``), and its original (h, w)."""
        cached = getattr(self, "_cached", None)  # set by cache_images()
        if cached is not None:
            im, hw = cached[i]
            return im.copy(), hw  # augmentations write into the image in place
        f = self.im_files[i]
        im = cv2.imread(f)
        if im is None:  # formats OpenCV lacks but PIL read during the scan
            try:
                with Image.open(f) as pil:
                    im = np.asarray(ImageOps.exif_transpose(pil).convert("RGB"))[:, :, ::-1]
            except OSError as exc:
                raise OSError(f"{f}: image became unreadable after the dataset scan ({exc})") from exc
        h0, w0 = im.shape[:2]
        r = min(self.fit_hw[0] / h0, self.fit_hw[1] / w0)
        if r != 1:
            interp = cv2.INTER_LINEAR if (self.augment or r > 1) else cv2.INTER_AREA
            im = cv2.resize(im, (round(w0 * r), round(h0 * r)), interpolation=interp)
        return im, (h0, w0)

    def load_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
        """Four images around a random centre, then random affine; returns pixel xyxy labels and polygons."""
        s = self.img_size
        centre = tuple(int(random.uniform(-b, 2 * s + b)) for b in self.mosaic_border)
        picks = [index] + random.choices(self.indices, k=3)
        random.shuffle(picks)
        tiles = [(self.load_image(i)[0], self.labels[i], self.segments[i] if self.task == "segment" else None)
                 for i in picks]
        img, labels, segments = mosaic4(tiles, s, centre)
        hyp = self.hyp
        return random_perspective(img, labels, segments, degrees=hyp["degrees"], translate=hyp["translate"],
                                  scale=hyp["scale"], shear=hyp["shear"], perspective=hyp["perspective"],
                                  border=self.mosaic_border)

    @staticmethod
    def collate_fn(batch):
        """Stack images; concatenate targets with column 0 set to the image's index in the batch.

        Segmentation items' masks are concatenated like the targets they belong to; their polygons
        stay one list per image.
        """
        ims, targets, paths, shapes, *segmentation = zip(*batch)
        for i, t in enumerate(targets):
            t[:, 0] = i
        collated = (torch.stack(ims, 0), torch.cat(targets, 0), paths, shapes)
        if not segmentation:
            return collated
        masks, polygons = segmentation
        return (*collated, torch.cat(masks, 0), polygons)


LoadImagesAndLabels = YoloDataset  # upstream's name, for code written against it


def _label_kind(scan, source: str, task: str) -> str:
    """What the split's label files hold: 'polygons', 'boxes', or '' when no file has a row.

    A mix is refused for segmentation (a box has no outline to learn a mask from) and reported for
    detection, which reads every polygon as its bounding box.
    """
    polygon_files, box_files = scan.files_of_kind("polygons"), scan.files_of_kind("boxes")
    if polygon_files and box_files:
        n_poly, n_box = len(polygon_files), len(box_files)
        mix = (f"{n_poly} label file{'s hold' if n_poly > 1 else ' holds'} polygons "
               f"(e.g. {img2label_paths(polygon_files[:1])[0]}) and {n_box} hold{'s' if n_box == 1 else ''} boxes "
               f"(e.g. {img2label_paths(box_files[:1])[0]})")
        if task == "segment":
            raise UserError(f"{source}: {mix}; segmentation needs a polygon for every instance: convert or "
                            "remove the box files")
        LOGGER.warning(f"WARNING {source}: {mix}; detection uses each polygon's bounding box")
        return "boxes"
    return "polygons" if polygon_files else "boxes" if box_files else ""


def model_task(model: torch.nn.Module) -> str:
    """'segment' when the model's last layer is a segmentation head, else 'detect' (what data it needs).

    Read from the head's prototype branch, which every segmentation head has (ours and upstream's),
    so library code copied into an upstream checkout by patch_yolov9.sh answers the same.
    """
    layers = getattr(getattr(model, "module", model), "model", None)  # DDP wraps the model
    return "segment" if layers is not None and hasattr(layers[-1], "proto") else "detect"


def check_task(dataset: YoloDataset, model: str, task: str) -> None:
    """Refuse a model whose task does not fit the dataset's labels, naming both.

    ``model`` is how the user knows the model (a weights file, a config); ``task`` is its head's task.
    A detection model on polygon labels would be trained or scored on boxes while the user expects
    masks; a segmentation model on box labels has no mask to learn or score.
    """
    source = dataset.source
    if task == "segment" and dataset.label_kind == "boxes":
        raise UserError(f"{model} is a segmentation model but {source} holds box labels (class x y w h), not "
                        "polygons; pass a segmentation dataset (class x1 y1 x2 y2 ... rows) or a detection model")
    if task == "detect" and dataset.label_kind == "polygons":
        raise UserError(f"{model} is a detection model but {source} holds segmentation labels (polygons); "
                        "pass a segmentation model (e.g. gelan-c-seg.yaml) or a box-labelled dataset")


@contextlib.contextmanager
def _seeded_draws(seed: int, epoch: int, index: int):
    """``random`` and numpy seeded for one image, and given back as they were (a worker-less
    loader runs in the caller's process, whose generators are not ours to move)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    py_seed, np_seed = np.random.SeedSequence((seed, epoch, index)).generate_state(2)
    random.seed(int(py_seed))
    np.random.seed(int(np_seed))
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def set_epoch(loader, epoch: int) -> None:
    """Make ``loader``'s next pass epoch ``epoch``'s: its shuffle order and its augmentations.

    Both follow from (seed, epoch) alone, so a run resumed at this epoch draws exactly what the
    uninterrupted run drew, with persistent workers and any worker count. An ``EpochLoader``
    carries the epoch in every sample it asks for.
    """
    if isinstance(loader, EpochLoader):
        loader.set_epoch(epoch)
        return
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def init_worker(worker_id: int) -> None:
    """Seed each worker's ``random`` and numpy from torch's per-worker seed; keep OpenCV single-threaded.

    Workers already run in parallel; OpenCV's own thread pool inside each of them would only
    oversubscribe the cores.
    """
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    cv2.setNumThreads(0)


def create_dataloader(path, imgsz: int, batch_size: int, stride: int, hyp=None, augment: bool = False,
                      rect: bool = False, pad: float = 0.0, workers: int = 8, shuffle: bool = False, prefix: str = "",
                      seed: int = 0, close_mosaic: bool = False, rank: int = -1, nc: int | None = None,
                      fixed_hw: tuple[int, int] | None = None, drop_last: bool = False, task: str = "detect",
                      mask_ratio: int = MASK_RATIO):
    """Build a ``YoloDataset`` and its DataLoader; returns (loader, dataset).

    ``task='segment'`` batches are ``(images, targets, paths, shapes, masks, polygons)``; see ``YoloDataset``.

    ``nc`` lets the scan drop rows whose class id is out of range; pass the data yaml's ``nc``.
    ``fixed_hw``: letterbox to exactly this (h, w), e.g. a non-square exported model's input.
    ``close_mosaic`` is accepted for upstream's signature: ``dataset.close_mosaic()`` works with
    any loader here, because the switch lives in shared memory that persistent workers see.
    ``rank`` >= 0 shards batches over DDP processes; local rank 0 scans first, the rest reuse its cache.
    A shuffled loader's order and augmentations come from ``seed`` and the epoch: call
    ``set_epoch(loader, epoch)`` before each pass (an epoch that is never set repeats the order).
    A shuffled, augmenting (training) loader is an ``EpochLoader``: one stream of batches over all
    epochs, so its workers prepare the next epoch while the current one finishes; with
    ``drop_last`` every batch has the full size (a compiled step then never sees a new shape).
    """
    if rect and shuffle:
        LOGGER.warning(f"{prefix}WARNING rect batches need a fixed order; shuffle turned off")
        shuffle = False
    with _rank_zero_first(rank):
        dataset = YoloDataset(path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect, stride=int(stride),
                              pad=pad, prefix=prefix, nc=nc, fixed_hw=fixed_hw, seed=seed, task=task,
                              mask_ratio=mask_ratio)
    batch_size = min(batch_size, len(dataset))
    n_devices = max(torch.cuda.device_count(), 1)
    n_workers = min((os.cpu_count() or 1) // n_devices, batch_size if batch_size > 1 else 0, workers)
    common = dict(num_workers=n_workers, persistent_workers=n_workers > 0, pin_memory=torch.cuda.is_available(),
                  collate_fn=YoloDataset.collate_fn, worker_init_fn=init_worker)
    if augment and shuffle:  # training: one stream of batches over all epochs, DDP-sharded by the sampler
        sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=True, seed=seed, drop_last=drop_last)
        return EpochLoader(DataLoader(dataset, batch_sampler=sampler, **common)), dataset
    # One process shuffles like one DDP rank of one: the order is a function of (seed, epoch).
    sampler = None if rank == -1 and not shuffle else DistributedSampler(
        dataset, num_replicas=1 if rank == -1 else None, rank=0 if rank == -1 else None, shuffle=shuffle, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(seed + max(rank, 0))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator, **common)
    return loader, dataset


@contextlib.contextmanager
def _rank_zero_first(rank: int):
    """Let local rank 0 build the label cache while the other DDP ranks wait, then read it."""
    synced = rank >= 0 and dist.is_available() and dist.is_initialized()
    if synced and rank != 0:
        dist.barrier()
    yield
    if synced and rank == 0:
        dist.barrier()


def _training_hyp(hyp: dict | str | Path | None) -> dict:
    if hyp is None:
        return load_hyp(DEFAULT_HYP)
    if isinstance(hyp, (str, Path)):
        return load_hyp(hyp)
    missing = [k for k in AUGMENT_KEYS if k not in hyp]
    if missing:
        raise UserError(f"hyp: augmentation needs {', '.join(missing)}")
    return hyp
