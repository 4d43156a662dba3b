"""Media bytes → pixels, safely: image, video and mesh decoders that turn any failure into a
counted skip (:mod:`.decode`), an offscreen mesh renderer for multi-view 3D (:mod:`.render`) and
the vision tower's preprocessing, resize, pad and normalise (:mod:`.preprocess`).

Plugins import the decoders from here: ``from mmscene.data.media import decode_image``.
"""

from mmscene.data.media.decode import (
    MAX_IMAGE_PIXELS,
    decode_image,
    decode_video,
    fps_indices,
    load_mesh,
    uniform_indices,
)
from mmscene.data.media.render import camera_distance, orbit_poses, render_views

__all__ = [
    "MAX_IMAGE_PIXELS",
    "camera_distance",
    "decode_image",
    "decode_video",
    "fps_indices",
    "load_mesh",
    "orbit_poses",
    "render_views",
    "uniform_indices",
]
