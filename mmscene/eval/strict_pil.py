"""Undo lmms-eval's process-wide ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True``.

Importing ``lmms_eval.api.task`` sets it, after which PIL decodes a cut-off image as grey bands
without a word. mmscene's decoders refuse to run under it (mmscene.data.media.decode), so every
module that imports lmms-eval calls :func:`restore_strict_pil` after doing so: a truncated image
is then an error in the harness as in training.
"""

from __future__ import annotations

from PIL import ImageFile


def restore_strict_pil() -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = False
