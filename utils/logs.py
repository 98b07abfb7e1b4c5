"""The project's logger, in a module of its own so that code copied into an upstream checkout
(patch_yolov9.sh), where utils/torch_utils.py is upstream's file without it, finds it too."""
from __future__ import annotations

import logging

LOGGER = logging.getLogger("yolov9")
