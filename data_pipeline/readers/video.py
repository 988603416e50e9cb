"""Video reader (PyAV, an optional dependency): frames of the first video stream."""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from data_pipeline.readers import common, images
from data_pipeline.readers.common import Item, ReaderError

EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
INSTALL_HINT = 'pip install "biovfm-jax[video]"'
OPTIONS = {"stride": common.Option(1, common.positive_int, "every n-th frame"),
           "max_frames": common.Option(None, common.positive_int_or_none,
                                       "at most this many frames per file (null: all)")}


def _is_grey(pix_fmt: str | None) -> bool:
  return bool(pix_fmt) and pix_fmt.startswith(("gray", "ya", "mono", "y400"))


def read(path: str, options: dict[str, Any] | None = None) -> Iterator[Item]:
  """Every `stride`-th frame of the first video stream (PyAV), as RGB, or grey
  when the stream is grey or its colour frames have equal channels; index =
  frame number (0-based, decoding order), at most `max_frames` frames."""
  path = os.fspath(path)
  opts = common.validate(OPTIONS, "video", options, path)
  common.check_file(path)
  try:
    import av  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ReaderError(f'{path}: reading video needs the package "av" (PyAV), which is not '
                      f"installed: {INSTALL_HINT}") from e
  try:
    container = av.open(path)
  except Exception as e:  # av.error.* for unknown containers and damaged headers
    raise ReaderError(f"{path}: cannot open video: {e}") from e
  stride, limit = opts["stride"], opts["max_frames"]
  with container:
    if not container.streams.video:
      raise ReaderError(f"{path}: no video stream in the file")
    stream = container.streams.video[0]
    codec = stream.codec_context.name
    n, taken = -1, 0
    try:
      for frame in container.decode(stream):
        n += 1
        if n % stride:
          continue
        pix_fmt = frame.format.name
        if _is_grey(pix_fmt):
          pixels, text = frame.to_ndarray(format="gray"), f"video {codec} {pix_fmt} -> grey"
        else:
          pixels = images.squeeze_gray(frame.to_ndarray(format="rgb24"))
          text = f"video {codec} {pix_fmt} -> RGB" + (
              " (equal channels -> grey)" if pixels.ndim == 2 else "")
        yield np.ascontiguousarray(pixels), common.meta(path, n, pixels, text)
        taken += 1
        if limit is not None and taken >= limit:
          return
    except Exception as e:  # av.error.* for damaged packets
      raise ReaderError(f"{path}: cannot decode video frame {n}: {e}") from e
  if n < 0:
    raise ReaderError(f"{path}: the video stream has no decodable frames")
