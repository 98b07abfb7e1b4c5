"""A training run's inputs checked before torch loads: train.py refuses a bad flag value or a mistyped
file in a fraction of a second instead of after seconds of imports. Each check is the one the trainer
itself runs again as it reads the file (a resume takes its files from the checkpoint, which it reads)."""
from __future__ import annotations

import argparse

from models.config import load_config, resolve_config
from utils.data.config import load_data_config, load_hyp
from utils.errors import UserError
from utils.options import check_flags
from utils.paths import existing_file

NO_MODEL = "train: pass --cfg (model yaml, e.g. gelan-s.yaml) or --weights (a .pt checkpoint)"


def check_inputs(opt: argparse.Namespace) -> None:
    """Raise ``UserError`` for the first bad flag value, hyp, data yaml, model yaml or checkpoint path."""
    check_flags(vars(opt))
    if opt.resume:
        return
    load_hyp(opt.hyp)
    load_data_config(opt.data)
    if not (opt.cfg or opt.weights):
        raise UserError(NO_MODEL)
    if opt.cfg:
        load_config(resolve_config(opt.cfg))
    if opt.weights:
        existing_file(opt.weights, "checkpoint")
