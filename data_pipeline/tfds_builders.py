"""tensorflow-datasets builders for the evaluation benchmarks, written as ArrayRecord.

ArrayRecord gives random access, so the eval pipeline (data_pipeline/eval_loader.py)
reads any example by index through `builder.as_data_source(split)`, with grain,
without tensorflow. Examples keep their source order (`disable_shuffling`), so
record i of a split is example `index` i.

  medmnist/<flag>_<size>   one config per MedMNIST 2D benchmark and size, from
                           the npz files in a manual directory (downloaded with
                           MD5 checks when missing, see readers/medmnist.py)
  mini_modality/<size>px   offline demo: the modality (7 classes) of the images
                           of the built-in "mini" corpus, squared and resized
  mni_anatomy/<size>px     offline: the plane and level (9 classes) of MNI152
                           T1 slices (data_pipeline/anatomy.py); random weights
                           do not pass it, unlike mini_modality

Features: `image` PNG (S, S, C) uint8 at the stored size, `label` int64 (L,),
`index` int64 (the example's number in its split; mini_modality also has
`record`, its number in the mini corpus). Data lands in
`<data_dir>/<builder>/<config>/<version>/` (e.g. data/medmnist/breastmnist_28/1.0.0/
medmnist-train.array_record-00000-of-00001 beside dataset_info.json).

mini_modality splits are stratified by modality: within a modality, records
sorted by a hash of (source, path, index) go 70/15/15 to train/val/test. Tiles
cut from the same photograph can land in different splits, so it is a smoke
test of the eval code, not a measure of generalisation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_pipeline import records, shards
from data_pipeline.readers import medmnist

SPLITS = medmnist.SPLITS
MINI_SIZES = medmnist.SIZES
# The modalities of the mini_v1 corpus, in label order.
MINI_MODALITIES = ("CT", "MR", "NM", "fundus", "microscopy", "pathology", "ultrasound")
MINI_FRACTIONS = (0.70, 0.15)  # train, val; test takes the rest
MINI_BENCHMARK = "mini_modality"
ANATOMY_BENCHMARK = "mni_anatomy"


def encode_png(pixels: np.ndarray) -> bytes:
  """uint8 (H, W), (H, W, 1) or (H, W, 3) -> PNG bytes (PIL, no tensorflow)."""
  return records.encode_image(np.ascontiguousarray(pixels), "png")


def _features(size: int, channels: int, label_width: int,
              **extra) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(size, size, channels), dtype=np.uint8,
                                   encoding_format="png"),
      "label": tfds.features.Tensor(shape=(label_width,), dtype=np.int64),
      "index": tfds.features.Scalar(dtype=np.int64),
      **extra,
  })


class _QuietBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """prepare() says what it builds in one log line: no tfds prints to stdout."""

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


@dataclasses.dataclass(eq=False)
class MedMNISTConfig(tfds.core.BuilderConfig):
  flag: str = ""
  size: int = 28


class MedMNIST(_QuietBuilder):
  """MedMNIST v2/+ 2D benchmarks from their npz files (config `<flag>_<size>`)."""

  name = "medmnist"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "MedMNIST+ npz (Zenodo record 10519652) as ArrayRecord."}
  BUILDER_CONFIGS = [
      MedMNISTConfig(name=f"{flag}_{size}", flag=flag, size=size,
                     description=f"{flag} at {size} px ({medmnist.BENCHMARKS[flag].task})")
      for flag in medmnist.FLAGS for size in medmnist.SIZES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put MedMNIST's `{flag}.npz` (28 px) or `{flag}_{size}.npz` in the manual "
      "directory (`python -m data_pipeline.readers.medmnist --root DIR`).")

  def _info(self) -> tfds.core.DatasetInfo:
    b = medmnist.benchmark(self.builder_config.flag)
    return self.dataset_info_from_configs(
        description=f"MedMNIST {b.flag}: {b.task}, {b.channels} channel(s), "
                    f"{b.num_classes} classes/labels.",
        features=_features(self.builder_config.size, b.channels, b.label_width),
        homepage="https://medmnist.com/",
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(task=b.task, num_classes=b.num_classes),
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    path = medmnist.npz_path(dl_manager.manual_dir, cfg.flag, cfg.size)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"medmnist/{cfg.name}: {path} does not exist; "
                              + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    medmnist.npz_header(path, cfg.flag, cfg.size)  # fail before writing anything
    return {split: self._generate_examples(path, split) for split in SPLITS}

  def _generate_examples(self, path: str, split: str):
    flag = self.builder_config.flag
    labels = medmnist.load_npz(path, flag, keys=(f"{split}_labels",))[f"{split}_labels"]
    i = 0
    for chunk in medmnist.iter_npz_rows(path, f"{split}_images"):
      for pixels in chunk:
        yield i, {"image": encode_png(pixels), "label": labels[i].astype(np.int64), "index": i}
        i += 1


@dataclasses.dataclass(eq=False)
class SizeConfig(tfds.core.BuilderConfig):
  """A built-in benchmark at one stored size (config `<size>px`)."""
  size: int = 64


def _sized_configs(what: str) -> list[SizeConfig]:
  return [SizeConfig(name=f"{s}px", size=s, description=f"{what} at {s} px")
          for s in MINI_SIZES]


def _classes_info(builder, description: str, classes, **extra) -> tfds.core.DatasetInfo:
  """A built-in benchmark's info: RGB images, one multi-class label."""
  return builder.dataset_info_from_configs(
      description=description,
      features=_features(builder.builder_config.size, 3, 1, **extra),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(task="multi-class", classes=list(classes),
                                      num_classes=len(classes)))


def square_resize(pixels: np.ndarray, size: int) -> np.ndarray:
  """Zero-pad to a centred square (keeps the aspect), resize to size x size, RGB."""
  h, w = pixels.shape[:2]
  side = max(h, w)
  rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=-1)
  square = np.zeros((side, side, 3), np.uint8)
  top, left = (side - h) // 2, (side - w) // 2
  square[top:top + h, left:left + w] = rgb
  return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR))


def mini_split_of(headers: list[dict]) -> list[str]:
  """The split of each record (by its header), stratified by modality.

  Within a modality, records sorted by sha1(source, path, index) go to train
  (first 70%), val (next 15%) and test (the rest).
  """
  by_modality: dict[str, list[tuple[str, int]]] = {}
  for i, h in enumerate(headers):
    ident = json.dumps([h.get("source"), h.get("path"), h.get("index")], sort_keys=True)
    digest = hashlib.sha1(ident.encode()).hexdigest()
    by_modality.setdefault(str(h.get("modality")), []).append((digest, i))
  out = [""] * len(headers)
  for items in by_modality.values():
    items.sort()
    n = len(items)
    n_train = round(MINI_FRACTIONS[0] * n)
    n_val = round(MINI_FRACTIONS[1] * n)
    for rank, (_, i) in enumerate(items):
      out[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
  return out


class MiniModality(_QuietBuilder):
  """Modality classification on the built-in mini corpus (config `<size>px`)."""

  name = MINI_BENCHMARK
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "mini_v1 corpus, 7 modalities, 70/15/15 stratified."}
  BUILDER_CONFIGS = _sized_configs("mini corpus modality")

  def __init__(self, *, cache_dir: str | os.PathLike | None = None, **kwargs):
    # Where the mini corpus is (built there on first use); not part of the data.
    self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _classes_info(self, "Modality of the images of the built-in mini corpus "
                               f"({', '.join(MINI_MODALITIES)}).", MINI_MODALITIES,
                         record=tfds.features.Scalar(dtype=np.int64))

  def _split_generators(self, dl_manager):
    del dl_manager  # the corpus is built locally, nothing to download
    import grain  # pylint: disable=import-outside-toplevel
    from data_pipeline import mini  # pylint: disable=import-outside-toplevel
    source = grain.sources.ArrayRecordDataSource(
        mini.build_mini_corpus(self.cache_dir))
    headers = [records.decode_record(source[i])[1] for i in range(len(source))]
    for i, h in enumerate(headers):
      if h.get("modality") not in MINI_MODALITIES:
        raise ValueError(f"mini corpus record {i} ({h.get('path')}) has modality "
                         f"{h.get('modality')!r}, not one of {MINI_MODALITIES}")
    split_of = mini_split_of(headers)
    return {split: self._generate_examples(source, headers, split_of, split)
            for split in SPLITS}

  def _generate_examples(self, source, headers, split_of, split):
    size = self.builder_config.size
    members = [i for i, s in enumerate(split_of) if s == split]
    for k, i in enumerate(members):
      pixels, _ = records.read_record(source[i])
      label = MINI_MODALITIES.index(headers[i]["modality"])
      yield k, {"image": encode_png(square_resize(pixels, size)),
                "label": np.array([label], np.int64), "index": k, "record": i}


class MniAnatomy(_QuietBuilder):
  """Plane and level of MNI152 T1 slices (config `<size>px`): data_pipeline/anatomy.py."""

  name = ANATOMY_BENCHMARK
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "MNI152 1 mm, 3 planes x 3 levels, blocks of 4 slices."}
  BUILDER_CONFIGS = _sized_configs("MNI152 slice plane and level")

  def _info(self) -> tfds.core.DatasetInfo:
    from data_pipeline import anatomy  # pylint: disable=import-outside-toplevel
    return _classes_info(self, "Plane and level (3 x 3 classes) of the MNI152 T1 "
                               "template's slices.", anatomy.CLASSES)

  def _split_generators(self, dl_manager):
    del dl_manager  # nilearn ships the template: nothing to download
    from data_pipeline import anatomy  # pylint: disable=import-outside-toplevel
    items = list(anatomy.examples(self.builder_config.size))
    return {split: self._generate_examples([x for x in items if x[0] == split])
            for split in SPLITS}

  def _generate_examples(self, items):
    for k, (_, label, pixels) in enumerate(items):
      yield k, {"image": encode_png(pixels), "label": np.array([label], np.int64), "index": k}


BENCHMARKS = (*medmnist.FLAGS, MINI_BENCHMARK, ANATOMY_BENCHMARK)


def builder(benchmark: str, *, size: int, data_dir: str | os.PathLike,
            cache_dir: str | None = None) -> tfds.core.GeneratorBasedBuilder:
  """The (maybe not yet prepared) builder of `benchmark` at `size` px."""
  data_dir = os.fspath(data_dir)
  if benchmark == MINI_BENCHMARK:
    if int(size) not in MINI_SIZES:
      raise ValueError(f"{benchmark}: size must be one of {MINI_SIZES}, got {size}")
    return MiniModality(config=f"{int(size)}px", cache_dir=cache_dir, data_dir=data_dir,
                        file_format="array_record")
  if benchmark == ANATOMY_BENCHMARK:
    if int(size) not in MINI_SIZES:
      raise ValueError(f"{benchmark}: size must be one of {MINI_SIZES}, got {size}")
    return MniAnatomy(config=f"{int(size)}px", data_dir=data_dir, file_format="array_record")
  if benchmark not in medmnist.BENCHMARKS:
    raise KeyError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
  return MedMNIST(config=f"{benchmark}_{medmnist.check_size(size)}",
                  data_dir=data_dir, file_format="array_record")


def prepare(benchmark: str, *, size: int, data_dir: str | os.PathLike,
            npz_dir: str | os.PathLike | None = None, cache_dir: str | None = None,
            download: bool = True) -> tfds.core.GeneratorBasedBuilder:
  """Build `benchmark` at `size` px under `data_dir` unless already built; return its builder.

  MedMNIST reads `npz_dir` (default `<data_dir>/medmnist_npz`); a missing npz
  is downloaded there with MD5 checks when `download`, else FileNotFoundError.
  mini_modality builds the mini corpus in `cache_dir` first if needed.
  """
  data_dir = os.fspath(data_dir)
  b = builder(benchmark, size=size, data_dir=data_dir, cache_dir=cache_dir)
  if b.is_prepared():
    return b
  os.makedirs(data_dir, exist_ok=True)
  with shards.file_lock(os.path.join(data_dir, f".{b.name}_{b.builder_config.name}.lock")):
    b = builder(benchmark, size=size, data_dir=data_dir, cache_dir=cache_dir)
    if b.is_prepared():
      return b  # another process built it while we waited
    manual_dir = None
    if benchmark not in (MINI_BENCHMARK, ANATOMY_BENCHMARK):
      manual_dir = os.fspath(npz_dir or os.path.join(data_dir, "medmnist_npz"))
      if not os.path.isfile(medmnist.npz_path(manual_dir, benchmark, size)):
        if not download:
          raise FileNotFoundError(f"{benchmark}: no {medmnist.npz_name(benchmark, size)} "
                                  f"in {manual_dir} and download=False")
        medmnist.download(benchmark, size, manual_dir)
    # One line of ours instead of tfds's progress bars (a few seconds at most).
    logging.info("Building %s/%s once into %s ...", b.name, b.builder_config.name, data_dir)
    t0 = time.time()
    tfds.disable_progress_bar()
    b.download_and_prepare(
        download_dir=os.path.join(data_dir, "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    logging.info("Built %s/%s: %s examples in %.0f s", b.name, b.builder_config.name,
                 f"{sum(s.num_examples for s in b.info.splits.values()):,}", time.time() - t0)
  return builder(benchmark, size=size, data_dir=data_dir, cache_dir=cache_dir)
