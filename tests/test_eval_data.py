"""Benchmark data for evaluation: MedMNIST files and download, tfds builders, eval batches."""
from __future__ import annotations

import collections
import hashlib
import importlib.util
import http.server
import os
import threading

import numpy as np
import pytest
from PIL import Image

from data_pipeline import eval_loader, records, tfds_builders
from data_pipeline.readers import medmnist


# --- the table and npz files --------------------------------------------------

def _medmnist_info() -> dict:
  """medmnist's INFO, read from its info.py alone (the package imports torch)."""
  spec = importlib.util.find_spec("medmnist")
  if spec is None:
    pytest.skip("medmnist (a test-only dependency) is not installed")
  path = os.path.join(os.path.dirname(spec.origin), "info.py")
  module_spec = importlib.util.spec_from_file_location("_medmnist_info", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.INFO


def test_table_matches_medmnist_info():
  info = _medmnist_info()
  assert len(medmnist.BENCHMARKS) == 12
  for flag, b in medmnist.BENCHMARKS.items():
    i = info[flag]
    assert (b.task, b.channels, b.num_classes, b.splits) == (
        i["task"], i["n_channels"], len(i["label"]), i["n_samples"]), flag
    for size in medmnist.SIZES:
      suffix = "" if size == 28 else f"_{size}"
      assert b.md5[size] == i[f"MD5{suffix}"], (flag, size)
      assert b.url(size) == i[f"url{suffix}"], (flag, size)
  assert medmnist.benchmark("chestmnist").label_width == 14
  assert medmnist.benchmark("retinamnist").label_width == 1
  assert medmnist.BENCHMARKS["tissuemnist"].splits == {"train": 165466, "val": 23640,
                                                       "test": 47280}


def test_npz_names():
  assert medmnist.npz_path("/d", "breastmnist", 28) == "/d/breastmnist.npz"
  assert medmnist.npz_path("/d", "pathmnist", 224) == "/d/pathmnist_224.npz"
  with pytest.raises(ValueError, match="32"):
    medmnist.npz_path("/d", "pathmnist", 32)
  with pytest.raises(KeyError, match="nosuchmnist"):
    medmnist.npz_path("/d", "nosuchmnist", 28)


def test_synthetic_npz_layout_and_streaming(tmp_path):
  path = medmnist.make_synthetic_npz(tmp_path / "pathmnist_64.npz", "pathmnist", 64, (20, 5, 6))
  header = medmnist.npz_header(path, "pathmnist", 64)
  assert header["train_images"] == ((20, 64, 64, 3), np.uint8)
  assert header["test_labels"][0] == (6, 1)
  data = medmnist.load_npz(path, "pathmnist")
  assert data["val_labels"].max() < 9
  rows = list(medmnist.iter_npz_rows(path, "train_images", chunk=7))
  assert [len(r) for r in rows] == [7, 7, 6]
  np.testing.assert_array_equal(np.concatenate(rows), data["train_images"])
  chest = medmnist.load_npz(medmnist.make_synthetic_npz(
      tmp_path / "chestmnist.npz", "chestmnist", 28, (50, 2, 2)), "chestmnist")
  assert chest["train_images"].shape == (50, 28, 28) and chest["train_labels"].shape == (50, 14)
  assert set(np.unique(chest["train_labels"])) == {0, 1}
  with pytest.raises(medmnist.NpzFormatError, match="holds 64 px images, expected 128"):
    medmnist.npz_header(path, "pathmnist", 128)


def test_synthetic_classes_are_learnable(tmp_path):
  """A least-squares linear classifier on raw pixels beats chance clearly."""
  data = medmnist.load_npz(medmnist.make_synthetic_npz(
      tmp_path / "organamnist.npz", "organamnist", 28, (600, 10, 300)), "organamnist")
  x = np.c_[data["train_images"].reshape(600, -1) / 255.0, np.ones(600)]
  xt = np.c_[data["test_images"].reshape(300, -1) / 255.0, np.ones(300)]
  y = np.eye(11)[data["train_labels"][:, 0]]
  w = np.linalg.solve(x.T @ x + 30 * np.eye(x.shape[1]), x.T @ y)
  acc = np.mean((xt @ w).argmax(1) == data["test_labels"][:, 0])
  assert acc > 3 / 11, acc  # chance is 1/11


def _write_npz(path, **arrays):
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return str(path)


def test_corrupt_npz_errors_name_file_and_key(tmp_path):
  good = medmnist.load_npz(medmnist.make_synthetic_npz(
      tmp_path / "breastmnist.npz", "breastmnist", 28, (4, 2, 2)), "breastmnist")
  missing = _write_npz(tmp_path / "missing.npz",
                       **{k: v for k, v in good.items() if k != "val_labels"})
  with pytest.raises(medmnist.NpzFormatError, match=r"missing\.npz: missing key 'val_labels'"):
    medmnist.load_npz(missing, "breastmnist")
  colour = _write_npz(tmp_path / "colour.npz", **dict(
      good, test_images=np.zeros((2, 28, 28, 3), np.uint8)))
  with pytest.raises(medmnist.NpzFormatError, match=r"colour\.npz: key 'test_images'"):
    medmnist.load_npz(colour, "breastmnist")
  wide = _write_npz(tmp_path / "wide.npz", **dict(good, train_labels=np.zeros((4, 14), np.uint8)))
  with pytest.raises(medmnist.NpzFormatError, match=r"wide\.npz: key 'train_labels'.*\(4, 1\)"):
    medmnist.load_npz(wide, "breastmnist")
  floats = _write_npz(tmp_path / "floats.npz", **dict(
      good, val_images=good["val_images"].astype(np.float32)))
  with pytest.raises(medmnist.NpzFormatError, match=r"floats\.npz: key 'val_images' is float32"):
    medmnist.npz_header(floats, "breastmnist")
  bad_value = _write_npz(tmp_path / "value.npz", **dict(
      good, test_labels=np.array([[0], [2]], np.uint8)))
  with pytest.raises(medmnist.NpzFormatError, match=r"value\.npz: key 'test_labels'.*\[0, 2\)"):
    medmnist.load_npz(bad_value, "breastmnist")
  # Grey images stored with a trailing channel axis are fine.
  ok = _write_npz(tmp_path / "ok.npz", **dict(good, train_images=good["train_images"][..., None]))
  assert medmnist.load_npz(ok, "breastmnist")["train_images"].shape == (4, 28, 28)


# --- download against a local HTTP server -------------------------------------

class _Server(http.server.ThreadingHTTPServer):
  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.files: dict[str, bytes] = {}
    self.cut: set[str] = set()
    self.hits: collections.Counter = collections.Counter()


class _Handler(http.server.BaseHTTPRequestHandler):
  def do_GET(self):  # noqa: N802 (http.server's name)
    name = self.path.lstrip("/").split("?")[0]
    self.server.hits[name] += 1
    data = self.server.files.get(name)
    if data is None:
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    # A cut-off transfer: the whole length announced, half of it sent, closed.
    self.wfile.write(data[:len(data) // 2] if name in self.server.cut else data)

  def log_message(self, *args):
    pass


@pytest.fixture
def server(tmp_path):
  srv = _Server()
  thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  srv.base_url = f"http://127.0.0.1:{srv.server_address[1]}/files"
  yield srv
  srv.shutdown()
  srv.server_close()


def _npz_bytes(tmp_path, flag, size, seed):
  path = medmnist.make_synthetic_npz(tmp_path / f"src_{flag}_{size}.npz", flag, size,
                                     (30, 5, 5), seed=seed)
  with open(path, "rb") as f:
    return f.read()


def test_download_verifies_and_skips_existing(server, tmp_path, capsys):
  data = _npz_bytes(tmp_path, "breastmnist", 28, 0)
  server.files["files/breastmnist.npz"] = data
  md5 = hashlib.md5(data).hexdigest()
  root = tmp_path / "root"
  path = medmnist.download("breastmnist", 28, root, base_url=server.base_url, md5=md5)
  assert path == str(root / "breastmnist.npz")
  with open(path, "rb") as f:
    assert f.read() == data
  assert os.listdir(root) == ["breastmnist.npz"]
  assert "MB/s" in capsys.readouterr().err
  assert medmnist.load_npz(path, "breastmnist")["train_images"].shape == (30, 28, 28)
  # Second call: the file is there with the right MD5, nothing is fetched.
  assert medmnist.download("breastmnist", 28, root, base_url=server.base_url, md5=md5,
                           progress=False) == path
  assert server.hits["files/breastmnist.npz"] == 1
  # A file with the wrong content is replaced by a fresh download.
  with open(path, "wb") as f:
    f.write(b"stale")
  medmnist.download("breastmnist", 28, root, base_url=server.base_url, md5=md5, progress=False)
  assert server.hits["files/breastmnist.npz"] == 2
  with open(path, "rb") as f:
    assert f.read() == data


def test_download_checksum_mismatch_keeps_nothing(server, tmp_path):
  data = _npz_bytes(tmp_path, "chestmnist", 64, 1)
  server.files["files/chestmnist_64.npz"] = data
  root = tmp_path / "root"
  # No md5 override: the table's MD5 (of the real file) cannot match.
  with pytest.raises(medmnist.ChecksumError) as err:
    medmnist.download("chestmnist", 64, root, base_url=server.base_url, progress=False)
  msg = str(err.value)
  assert str(root / "chestmnist_64.npz") in msg
  assert medmnist.BENCHMARKS["chestmnist"].md5[64] in msg
  assert hashlib.md5(data).hexdigest() in msg
  assert os.listdir(root) == []


def test_download_cut_off_keeps_nothing(server, tmp_path):
  data = _npz_bytes(tmp_path, "dermamnist", 28, 2)
  server.files["files/dermamnist.npz"] = data
  server.cut.add("files/dermamnist.npz")
  root = tmp_path / "root"
  with pytest.raises(medmnist.DownloadError) as err:
    medmnist.download("dermamnist", 28, root, base_url=server.base_url,
                      md5=hashlib.md5(data).hexdigest(), progress=False)
  msg = str(err.value)
  assert f"{server.base_url}/dermamnist.npz" in msg
  assert f"after {len(data) // 2} of {len(data)} bytes" in msg
  assert not isinstance(err.value, medmnist.ChecksumError)
  assert os.listdir(root) == []
  with pytest.raises(medmnist.DownloadError, match="404"):
    medmnist.download("octmnist", 28, root, base_url=server.base_url, progress=False)
  assert os.listdir(root) == []


# --- tfds builders ------------------------------------------------------------

COUNTS = {"breastmnist": (37, 11, 13), "chestmnist": (30, 8, 9)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """breastmnist (1 ch, binary) and chestmnist (1 ch, multi-label) at 28 px,
  and pathmnist (3 ch, 9 classes) at 64 px, from generated npz files."""
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  root = tmp_path_factory.mktemp("eval_data")
  npz_dir, data_dir = root / "npz", root / "tfds"
  for flag, counts in COUNTS.items():
    medmnist.make_synthetic_npz(medmnist.npz_path(npz_dir, flag, 28), flag, 28, counts, seed=3)
  medmnist.make_synthetic_npz(medmnist.npz_path(npz_dir, "pathmnist", 64), "pathmnist", 64,
                              (9, 3, 4), seed=4)
  builders = {flag: tfds_builders.prepare(flag, size=28, data_dir=data_dir, npz_dir=npz_dir,
                                          download=False) for flag in COUNTS}
  builders["pathmnist"] = tfds_builders.prepare("pathmnist", size=64, data_dir=data_dir,
                                                npz_dir=npz_dir, download=False)
  return str(npz_dir), str(data_dir), builders


@pytest.mark.parametrize("flag,size", [("breastmnist", 28), ("chestmnist", 28),
                                       ("pathmnist", 64)])
def test_medmnist_builder_round_trips(prepared, flag, size):
  npz_dir, data_dir, builders = prepared
  b = builders[flag]
  assert b.data_dir == os.path.join(data_dir, "medmnist", f"{flag}_{size}", "1.0.0")
  assert b.info.metadata["task"] == medmnist.BENCHMARKS[flag].task
  data = medmnist.load_npz(medmnist.npz_path(npz_dir, flag, size), flag)
  for split in medmnist.SPLITS:
    assert any(f.startswith(f"medmnist-{split}.array_record") for f in os.listdir(b.data_dir))
    source = b.as_data_source(split)  # tfds's own decoding
    images, labels = data[f"{split}_images"], data[f"{split}_labels"]
    assert len(source) == len(images)
    for i in range(len(source)):
      ex = source[i]
      assert ex["index"] == i
      np.testing.assert_array_equal(ex["image"].reshape(images[i].shape), images[i])
      np.testing.assert_array_equal(ex["label"], labels[i])
      assert ex["label"].dtype == np.int64
      assert ex["label"].shape == (medmnist.BENCHMARKS[flag].label_width,)


def test_prepare_is_idempotent_and_checks_npz(prepared, tmp_path):
  npz_dir, data_dir, builders = prepared
  b = builders["breastmnist"]
  files = sorted(os.listdir(b.data_dir))
  mtimes = [os.path.getmtime(os.path.join(b.data_dir, f)) for f in files]
  again = tfds_builders.prepare("breastmnist", size=28, data_dir=data_dir, npz_dir=npz_dir,
                                download=False)
  assert again.data_dir == b.data_dir and sorted(os.listdir(b.data_dir)) == files
  assert [os.path.getmtime(os.path.join(b.data_dir, f)) for f in files] == mtimes
  # A corrupt npz fails with its file and key named, and nothing is prepared.
  good = medmnist.load_npz(os.path.join(npz_dir, "breastmnist.npz"), "breastmnist")
  _write_npz(tmp_path / "breastmnist_64.npz", **{k: v for k, v in good.items()
                                                 if k != "test_labels"})
  with pytest.raises(medmnist.NpzFormatError,
                     match=r"breastmnist_64\.npz: missing key 'test_labels'"):
    tfds_builders.prepare("breastmnist", size=64, data_dir=tmp_path / "d", npz_dir=tmp_path,
                          download=False)
  assert not tfds_builders.builder("breastmnist", size=64, data_dir=tmp_path / "d").is_prepared()
  with pytest.raises(FileNotFoundError, match="retinamnist.npz"):
    tfds_builders.prepare("retinamnist", size=28, data_dir=tmp_path / "d", npz_dir=tmp_path,
                          download=False)


def test_mini_modality_splits(tmp_path):
  import grain
  from data_pipeline import mini
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  b = tfds_builders.prepare("mini_modality", size=28, data_dir=tmp_path)
  assert b.data_dir == os.path.join(str(tmp_path), "mini_modality", "28px", "1.0.0")
  corpus = grain.sources.ArrayRecordDataSource(mini.build_mini_corpus())
  seen: dict[str, set[int]] = {}
  for split in tfds_builders.SPLITS:
    source = b.as_data_source(split)
    exs = [source[i] for i in range(len(source))]
    assert [ex["index"] for ex in exs] == list(range(len(exs)))
    seen[split] = {int(ex["record"]) for ex in exs}
    labels = collections.Counter(int(ex["label"][0]) for ex in exs)
    assert sorted(labels) == list(range(len(tfds_builders.MINI_MODALITIES))), split
    # Labels are the record's modality; images its squared, resized pixels.
    for ex in exs[::97]:
      pixels, header = records.read_record(corpus[int(ex["record"])])
      assert tfds_builders.MINI_MODALITIES[int(ex["label"][0])] == header["modality"]
      np.testing.assert_array_equal(ex["image"], tfds_builders.square_resize(pixels, 28))
  assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"]
  assert not seen["val"] & seen["test"]
  assert seen["train"] | seen["val"] | seen["test"] == set(range(len(corpus)))
  assert abs(len(seen["train"]) / len(corpus) - 0.70) < 0.01
  split = eval_loader.EvalSplit("mini_modality", "val", b)
  assert (split.task, split.num_classes, split.channels) == ("multi-class", 7, 3)


def test_mini_split_is_stratified_and_stable():
  headers = [{"source": "s", "path": f"p{i}", "index": i, "modality": "CT" if i % 3 else "MR"}
             for i in range(300)]
  split = tfds_builders.mini_split_of(headers)
  assert split == tfds_builders.mini_split_of(list(headers))
  for modality, n in (("CT", 200), ("MR", 100)):
    got = collections.Counter(s for h, s in zip(headers, split) if h["modality"] == modality)
    assert got == {"train": round(0.7 * n), "val": round(0.15 * n),
                   "test": n - round(0.7 * n) - round(0.15 * n)}
  # A record's split depends on its own identity, not on its position.
  assert tfds_builders.mini_split_of(headers[::-1]) == split[::-1]


# --- eval batches -------------------------------------------------------------

def _split(prepared, flag="breastmnist", split="train", size=28):
  _, data_dir, _ = prepared
  npz_dir = prepared[0]
  return eval_loader.load_split(flag, split, size=size, data_dir=data_dir, npz_dir=npz_dir,
                                download=False)


def _npz(prepared, flag="breastmnist", size=28):
  return medmnist.load_npz(medmnist.npz_path(prepared[0], flag, size), flag)


def _batches(s, batch_size, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return list(s.batches(batch_size, **kw))


def _unnormalise(image):
  return np.round((image * 0.5 + 0.5) * 255).astype(np.uint8)


def test_split_attributes_and_labels(prepared):
  s = _split(prepared, "chestmnist", "val")
  assert (s.name, s.split, s.task, s.num_classes, s.label_width) == (
      "chestmnist", "val", "multi-label, binary-class", 14, 14)
  assert s.num_examples == COUNTS["chestmnist"][1]
  np.testing.assert_array_equal(s.labels, _npz(prepared, "chestmnist")["val_labels"])
  b = _split(prepared, "breastmnist", "test")
  assert (b.task, b.num_classes, b.label_width, b.labels.shape) == ("binary-class", 2, 1, (13, 1))
  with pytest.raises(ValueError, match="split must be one of"):
    _split(prepared, "breastmnist", "dev")


def test_batches_shapes_padding_and_normalisation(prepared):
  s = _split(prepared)  # 37 training examples
  images = _npz(prepared)["train_images"]
  out = _batches(s, 16, augment=False)
  assert len(out) == 3 == s.num_batches(16)
  for b in out:
    assert b["image"].shape == (16, 28, 28, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (16, 1) and b["index"].shape == (16,)
    assert b["valid"].dtype == np.bool_
  assert out[-1]["valid"].sum() == 5 and out[-1]["valid"][:5].all()
  np.testing.assert_array_equal(out[-1]["index"][5:], -1)
  index = np.concatenate([b["index"][b["valid"]] for b in out])
  np.testing.assert_array_equal(index, np.arange(37))
  image = np.concatenate([b["image"][b["valid"]] for b in out])
  np.testing.assert_array_equal(_unnormalise(image), np.repeat(images[..., None], 3, -1))
  assert -1.0 <= image.min() and image.max() <= 1.0
  label = np.concatenate([b["label"][b["valid"]] for b in out])
  np.testing.assert_array_equal(label, s.labels)
  dropped = _batches(s, 16, augment=False, drop_last=True)
  assert len(dropped) == 2 and all(b["valid"].all() for b in dropped)
  # Colour images pass through as they are.
  p = _split(prepared, "pathmnist", "test", size=64)
  got = _batches(p, 4, augment=False)[0]
  np.testing.assert_array_equal(_unnormalise(got["image"]),
                                _npz(prepared, "pathmnist", 64)["test_images"])


def test_batches_resize(prepared):
  s = _split(prepared)
  images = _npz(prepared)["train_images"]
  b = _batches(s, 8, augment=False, image_size=40)[0]
  assert b["image"].shape == (8, 40, 40, 3)
  want = np.asarray(Image.fromarray(images[3]).resize((40, 40), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(_unnormalise(b["image"][3])[..., 0], want)


def test_shuffle_and_augmentation_are_pure_functions(prepared):
  s = _split(prepared)
  kw = dict(augment=True, shuffle=True, seed=5)
  a = _batches(s, 8, epoch=0, **kw)
  again = _batches(s, 8, epoch=0, num_threads=1, **kw)
  for x, y in zip(a, again, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  order0 = np.concatenate([b["index"][b["valid"]] for b in a])
  assert sorted(order0) == list(range(37)) and list(order0) != list(range(37))
  np.testing.assert_array_equal(order0, np.random.default_rng([5, 0]).permutation(37))
  b1 = _batches(s, 8, epoch=1, **kw)
  order1 = np.concatenate([b["index"][b["valid"]] for b in b1])
  assert list(order0) != list(order1)

  def by_index(batches):
    return {int(i): img for b in batches
            for i, img, v in zip(b["index"], b["image"], b["valid"]) if v}

  # An example's augmentation depends on (seed, epoch, index) only: not on the
  # order, the batch size or the threads.
  plain = by_index(_batches(s, 16, epoch=0, augment=True, seed=5))
  e0, e1 = by_index(a), by_index(b1)
  for i in range(37):
    np.testing.assert_array_equal(e0[i], plain[i])
  assert sum(not np.array_equal(e0[i], e1[i]) for i in range(37)) >= 35
  unaug = by_index(_batches(s, 16, augment=False))
  assert sum(not np.array_equal(e0[i], unaug[i]) for i in range(37)) >= 35


def test_process_shares_make_the_global_batch(prepared):
  s = _split(prepared, "chestmnist", "train")  # 30 examples
  kw = dict(augment=True, shuffle=True, seed=1, epoch=2)
  whole = _batches(s, 8, **kw)
  parts = [_batches(s, 8, process_index=p, process_count=2, **kw) for p in range(2)]
  assert len(whole) == len(parts[0]) == len(parts[1]) == 4
  for w, p0, p1 in zip(whole, *parts):
    assert p0["image"].shape == (4, 28, 28, 3)
    for k in w:
      np.testing.assert_array_equal(w[k], np.concatenate([p0[k], p1[k]]))
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    s.batches(8, augment=False, process_index=0, process_count=3)


def _rotate_nearest(pixels: np.ndarray, degrees: float) -> np.ndarray:
  """Counter-clockwise rotation about the image centre, nearest neighbour, fill 0:
  each output pixel centre maps back through the inverse rotation."""
  h, w = pixels.shape[:2]
  phi = np.deg2rad(degrees)
  y, x = np.mgrid[0:h, 0:w] + 0.5
  dx, dy = x - w / 2, y - h / 2
  # y points down, so a counter-clockwise turn on screen reads the source at:
  sx = np.cos(phi) * dx - np.sin(phi) * dy + w / 2
  sy = np.sin(phi) * dx + np.cos(phi) * dy + h / 2
  ix, iy = np.floor(sx).astype(int), np.floor(sy).astype(int)
  inside = (sx >= 0) & (sy >= 0) & (ix < w) & (iy < h)
  out = np.zeros_like(pixels)
  out[inside] = pixels[iy[inside], ix[inside]]
  return out


def test_rotation_and_crop_match_an_independent_computation(prepared):
  s = _split(prepared, "pathmnist", "train", size=64)
  images = _npz(prepared, "pathmnist", 64)["train_images"]
  seed, epoch, index = 42, 3, 5
  got = {int(i): img for b in _batches(s, 4, augment=True, seed=seed, epoch=epoch)
         for i, img in zip(b["index"], b["image"])}[index]
  rng = np.random.default_rng([seed, epoch, index])
  angle = rng.uniform(-30, 30)
  top, left = rng.integers(0, 9), rng.integers(0, 9)
  rotated = _rotate_nearest(images[index], angle)
  padded = np.zeros((72, 72, 3), np.uint8)
  padded[4:68, 4:68] = rotated
  want = padded[top:top + 64, left:left + 64]
  np.testing.assert_array_equal(_unnormalise(got), want)
  # The rotation really turns the image (counter-clockwise by a random angle).
  assert abs(angle) > 1 and not np.array_equal(rotated, images[index])


def test_rotation_direction_is_counter_clockwise():
  img = np.zeros((21, 21), np.uint8)
  img[10, 15:20] = 255  # a bar pointing right from the centre
  turned = eval_loader.random_rotation(img, _FixedRng(90.0))
  ys, xs = np.nonzero(turned)
  assert xs.min() >= 9 and xs.max() <= 11 and ys.max() < 10  # now points up


class _FixedRng:
  def __init__(self, value):
    self.value = value

  def uniform(self, low, high):
    assert (low, high) == (-30.0, 30.0)
    return self.value

