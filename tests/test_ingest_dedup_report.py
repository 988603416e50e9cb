"""Ingestion dedup (pixel hash, pHash, multi-index, resume) and the ingestion report."""
import io
import itertools
import re

import numpy as np
import pytest
from PIL import Image
from skimage import data

from data_pipeline.ingest import dedup, report
from data_pipeline.ingest.dedup import Deduplicator, hamming, perceptual_hash, pixel_hash

NEAR = 10  # the threshold the tests dedup with


def _real_images() -> dict[str, np.ndarray]:
  """Real photographs (grey and RGB) and crops of different regions of three."""
  names = ("camera", "cell", "retina", "astronaut", "coins", "moon", "immunohistochemistry",
           "microaneurysms", "page", "text", "clock", "grass", "gravel", "coffee", "chelsea",
           "rocket", "brick")
  imgs = {n: getattr(data, n)() for n in names}
  cam, ret, cell = imgs["camera"], imgs["retina"], imgs["cell"]
  imgs.update({"camera_tl": cam[:256, :256], "camera_tr": cam[:256, 256:],
               "camera_bl": cam[256:, :256], "camera_br": cam[256:, 256:],
               "retina_a": ret[300:700, 300:700], "retina_b": ret[700:1100, 700:1100],
               "cell_a": cell[:300, :300], "cell_b": cell[300:600, 250:550]})
  return imgs


IMAGES = _real_images()


def _jpeg(p, quality=70):
  buf = io.BytesIO()
  Image.fromarray(p).save(buf, "JPEG", quality=quality)
  return np.asarray(Image.open(buf))


def _resize(p, scale):
  h, w = p.shape[:2]
  return np.asarray(Image.fromarray(p).resize((round(w * scale), round(h * scale)),
                                              Image.Resampling.BICUBIC))


def _variants(p) -> dict[str, np.ndarray]:
  noisy = p + np.random.default_rng(0).normal(0, 3, p.shape)
  return {"x0.5": _resize(p, 0.5), "x0.7": _resize(p, 0.7), "x0.9": _resize(p, 0.9),
          "jpeg70": _jpeg(p), "noise3": np.clip(noisy, 0, 255).astype(np.uint8),
          "bright+5": np.clip(p.astype(int) + 5, 0, 255).astype(np.uint8)}


# --- hashes -------------------------------------------------------------------

def test_pixel_hash_keys_on_pixels_shape_and_dtype():
  cam = data.camera()
  h = pixel_hash(cam)
  assert len(h) == 40 and int(h, 16) >= 0
  assert pixel_hash(cam.copy()) == h and pixel_hash(np.asfortranarray(cam)) == h
  changed = cam.copy()
  changed[100, 100] ^= 1
  assert pixel_hash(changed) != h
  flat = np.arange(24, dtype=np.uint8)
  assert len({pixel_hash(flat.reshape(4, 6)), pixel_hash(flat.reshape(6, 4)),
              pixel_hash(flat.reshape(4, 6).astype(np.uint16))}) == 3


def test_phash_basics():
  cam = data.camera()
  assert hamming(0, 2**64 - 1) == 64 and hamming(0b1011, 0b0001) == 2
  h = perceptual_hash(cam)
  assert 0 <= h < 2**64 and h.bit_count() == 32  # median split of 64 coefficients
  # RGB hashes its luma: equal channels give the grey image's hash.
  assert perceptual_hash(np.stack([cam] * 3, -1)) == h == perceptual_hash(cam[..., None])
  assert perceptual_hash(np.full((10, 7), 77, np.uint8)) == 0  # flat images: no structure
  with pytest.raises(ValueError, match="uint8"):
    perceptual_hash(cam.astype(np.float32))
  with pytest.raises(ValueError, match="uint8"):
    perceptual_hash(np.zeros((8, 8, 4), np.uint8))
  with pytest.raises(ValueError, match="empty"):
    perceptual_hash(np.zeros((0, 8), np.uint8))


def test_phash_near_duplicates_close_different_images_far():
  hashes = {n: perceptual_hash(p) for n, p in IMAGES.items()}
  near = {(n, v): hamming(hashes[n], perceptual_hash(q))
          for n, p in IMAGES.items() for v, q in _variants(p).items()}
  assert max(near.values()) <= 4, sorted(near.items(), key=lambda kv: -kv[1])[:5]
  far = {(a, b): hamming(hashes[a], hashes[b]) for a, b in itertools.combinations(hashes, 2)}
  assert min(far.values()) >= 18, sorted(far.items(), key=lambda kv: kv[1])[:5]
  assert max(near.values()) < NEAR < min(far.values())


def test_deduplicator_on_real_stream():
  d = Deduplicator(NEAR)
  kept, reasons = [], {}
  for n, p in IMAGES.items():
    reason, h = d.check(p)
    assert reason is None and h == perceptual_hash(p), n
    kept.append(n)
  for n in ("camera", "retina", "cell_b"):
    assert d.check(IMAGES[n].copy())[0] == "exact duplicate"
    for v, q in _variants(IMAGES[n]).items():
      reasons[n, v] = d.check(q)[0]
  assert all(re.fullmatch(r"near duplicate \(distance [0-4]\)", r) for r in reasons.values()), \
      reasons
  assert len(d) == len(IMAGES)  # duplicates are not remembered
  # Exact-only mode keeps the edited copies but still drops the identical one.
  e = Deduplicator(None)
  assert e.check(IMAGES["camera"])[0] is None
  assert e.check(_jpeg(IMAGES["camera"]))[0] is None
  assert e.check(IMAGES["camera"].copy())[0] == "exact duplicate"


# --- the multi-index ------------------------------------------------------------

def _stream(n=400, seed=0):
  """Random 64-bit hashes with planted copies of earlier ones at 0-14 flipped
  bits, and a few exact repeats: (exact hex, phash) pairs."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    exact = f"{rng.integers(0, 2**63):016x}{i:016x}"
    if i >= 10 and rng.random() < 0.45:
      base = out[rng.integers(0, i)][1]
      flips = rng.choice(64, size=int(rng.integers(0, 15)), replace=False)
      out.append((exact, base ^ sum(1 << int(b) for b in flips)))
    elif i >= 10 and rng.random() < 0.05:
      out.append(out[rng.integers(0, i)])
    else:
      out.append((exact, int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))))
  return out


def _brute_force(stream, threshold):
  kept, keys, out = [], set(), []
  for exact, h in stream:
    if exact in keys:
      out.append("exact duplicate")
      continue
    d = min((hamming(h, k) for k in kept), default=99)
    if threshold is not None and d <= threshold:
      out.append(f"near duplicate (distance {d})")
      continue
    kept.append(h)
    keys.add(exact)
    out.append(None)
  return out


@pytest.mark.parametrize("threshold,bands", [(0, None), (3, None), (3, 4), (6, None),
                                             (10, None), (10, 11), (13, None), (None, None)])
def test_multi_index_matches_brute_force(threshold, bands):
  stream = _stream()
  want = _brute_force(stream, threshold)
  d = Deduplicator(threshold, bands=bands, buffer=32)  # small buffer: many merges
  got = [d.check_hashes(e, h) for e, h in stream]
  assert got == want
  if threshold:
    dist = [int(r.split()[-1][:-1]) for r in want if r and r.startswith("near")]
    assert len(dist) > 20 and max(dist) == threshold  # the boundary is exercised
  assert d._near is None or d._near._indexed >= len(d) / 2  # most went through the table


def test_band_plan_pigeonhole():
  for t in range(0, 17):
    plan = dedup.band_plan(t)
    assert sum(w for _, w, _ in plan) == 64 and max(w for _, w, _ in plan) <= 22
    # Any split of t differing bits over the bands leaves one band within its radius.
    assert sum(r + 1 for _, _, r in plan) == t + 1
  # The plain pigeonhole: 11 bands (nine of 6 bits, two of 5), one must match exactly.
  widths = [6] * 9 + [5] * 2
  assert dedup.band_plan(10, bands=11) == [
      (s, w, 0) for s, w in zip(np.cumsum([0] + widths[:-1]).tolist(), widths)]


def test_state_round_trip_gives_identical_decisions(tmp_path):
  stream = _stream(300, seed=1)
  whole = Deduplicator(NEAR, buffer=16)
  want = [whole.check_hashes(e, h) for e, h in stream]
  first = Deduplicator(NEAR, buffer=16)
  got = [first.check_hashes(e, h) for e, h in stream[:170]]
  first.save(tmp_path / "dedup.npz")
  resumed = Deduplicator.load(tmp_path / "dedup.npz", NEAR, buffer=16)
  assert len(resumed) == len(first)
  got += [resumed.check_hashes(e, h) for e, h in stream[170:]]
  assert got == want
  a, b = whole.state(), resumed.state()
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert a["phash"].dtype == np.uint64 and a["exact"].shape == (len(whole), 2)
  # In-memory state, exact-only mode.
  e = Deduplicator(None)
  [e.check_hashes(x, h) for x, h in stream[:50]]
  e2 = Deduplicator.from_state(e.state(), None)
  assert [e.check_hashes(x, h) for x, h in stream[50:]] == \
      [e2.check_hashes(x, h) for x, h in stream[50:]]
  with pytest.raises(ValueError, match="near_threshold=10"):
    Deduplicator.from_state(a, 8)


def test_bad_arguments():
  d = Deduplicator(4)
  with pytest.raises(ValueError, match="hex digest"):
    d.check_hashes("not hex", 1)
  with pytest.raises(ValueError, match="hex digest"):
    d.check_hashes("abcd", 1)
  with pytest.raises(ValueError, match="64-bit"):
    d.check_hashes("0" * 32, 2**64)
  with pytest.raises(ValueError, match="near_threshold"):
    Deduplicator(40)
  assert len(d) == 0


# --- samples and the report -------------------------------------------------------

def test_sample_keeper_bounded_deterministic_order_free():
  rng = np.random.default_rng(0)
  items = [(f"s{i % 3}", f"k{i}", rng.integers(0, 256, (120 + i % 7, 200, 3), dtype=np.uint8))
           for i in range(150)]
  a, b = report.SampleKeeper(8, seed=3), report.SampleKeeper(8, seed=3)
  for s, k, p in items:
    a.offer(s, p, key=k)
  for s, k, p in reversed(items):
    b.offer(s, p, key=k)
  sa, sb = a.samples(), b.samples()
  assert sorted(sa) == ["s0", "s1", "s2"] and all(len(v) == 8 for v in sa.values())
  assert all(max(t.shape[:2]) <= report.THUMB and t.shape[2] == 3 for v in sa.values() for t in v)
  assert all(np.array_equal(x, y) for s in sa for x, y in zip(sa[s], sb[s]))
  other = report.SampleKeeper(8, seed=4)
  for s, k, p in items:
    other.offer(s, p, key=k)
  assert not all(np.array_equal(x, y) for x, y in zip(sa["s0"], other.samples()["s0"]))
  # Not "the first 8": over 1000 keys, the picks spread over the stream.
  keeper = report.SampleKeeper(40, seed=0)
  tiny = np.zeros((4, 4), np.uint8)
  picked = [i for i in range(1000) if keeper.offer("x", tiny + (i % 200))]
  assert len(picked) > 40 and max(picked) > 500
  # Resume from state: the same sample as an uninterrupted stream.
  c = report.SampleKeeper(8, seed=3)
  for s, k, p in items[:70]:
    c.offer(s, p, key=k)
  c = report.SampleKeeper.from_state(c.state(), 8)
  for s, k, p in items[70:]:
    c.offer(s, p, key=k)
  sc = c.samples()
  assert all(np.array_equal(x, y) for s in sa for x, y in zip(sa[s], sc[s]))


SUMMARY = {
    "sources": {
        "skimage camera": {"inputs": 40, "written": 30, "rejected": 4, "exact_duplicates": 4,
                           "near_duplicates": 2, "modality": "CT"},
        "retina/fundus": {"inputs": 25, "written": 25, "rejected": 0, "exact_duplicates": 0,
                          "near_duplicates": 0, "modality": "fundus"},
        "broken": {"inputs": 3, "written": 0, "rejected": 3, "exact_duplicates": 0,
                   "near_duplicates": 0, "modality": "MR"},
    },
    "modalities": {"CT": 30, "fundus": 25, "MR": 0},
    "rejects": ([{"path": f"/d/x{i}.png", "reason": f"truncated PNG: /d/x{i}.png", "source":
                  "skimage camera"} for i in range(4)]
                + [{"path": f"/v/{i}.nii", "reason": "broken NIfTI header", "source": "broken"}
                   for i in range(3)]),
    "shards": {"count": 2, "bytes": 3 * 2**20, "sizes": [2**21, 2**20]},
    "near_threshold": NEAR,
}


def _table(md: str, heading: str) -> list[list[str]]:
  section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
  rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
  return [[c.strip() for c in r] for r in rows[1:]]  # without the header row


def test_write_report(tmp_path):
  keeper = report.SampleKeeper(12, seed=0)
  cam, ret = data.camera(), data.retina()
  for i in range(30):
    keeper.offer("skimage camera", cam[8 * i:8 * i + 256, 8 * i:8 * i + 256])
  for i in range(25):
    keeper.offer("retina/fundus", ret[40 * i:40 * i + 400, 40 * i:40 * i + 400])
  paths = report.write_report(SUMMARY, keeper.samples(), tmp_path / "r", columns=5)
  assert set(paths) == {"markdown", "html", "modalities", "contact:skimage camera",
                        "contact:retina/fundus", "contact:broken"}
  assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(
      ["report.md", "report.html", "modalities.png", "contact_skimage_camera.png",
       "contact_retina_fundus.png", "contact_broken.png"])

  md = open(paths["markdown"]).read()
  rows = _table(md, "Sources")
  keys = report.COUNT_KEYS
  for row, (name, s) in zip(rows, SUMMARY["sources"].items()):
    assert row[:2] == [name, s["modality"]] and [int(c) for c in row[2:]] == [s[k] for k in keys]
  assert rows[-1][0] == "**Total**" and [int(c) for c in rows[-1][2:]] == [
      sum(s[k] for s in SUMMARY["sources"].values()) for k in keys]
  assert [r[:2] for r in _table(md, "Modalities")] == [["CT", "30"], ["fundus", "25"], ["MR", "0"]]
  reasons = _table(md, "Rejected inputs")
  assert reasons == [["truncated PNG: {file}", "4", "skimage camera", "/d/x0.png"],
                     ["broken NIfTI header", "3", "broken", "/v/0.nii"]]
  assert "Counts reconcile" in md and "2 shards, 3.0 MiB in all" in md
  assert "![Samples of retina/fundus](contact_retina_fundus.png)" in md

  page = open(paths["html"]).read()
  assert page.count("<tr>") == md.count("\n| ") == 12  # the same table rows
  assert "<td class=\"r\">68</td>" in page and 'src="contact_broken.png"' in page

  with Image.open(paths["modalities"]) as chart:
    assert chart.size[0] >= 1000 and 200 <= chart.size[1] <= 300  # readable, 3 rows
    px = np.asarray(chart.convert("RGB"))
  # Bar lengths follow the counts: CT's (30) is 30/25 fundus's.
  row = lambda i: report.BAR_TOP + i * report.BAR_ROW + report.BAR_ROW // 2
  lengths = [int(np.all(px[row(i)] == c, axis=-1).sum()) for i, c in
             enumerate(report._PALETTE[:2])]
  assert lengths[0] > 600 and abs(lengths[1] / lengths[0] - 25 / 30) < 0.01
  # A count axis under the bars: a black line as long as the longest bar, with ticks.
  axis = np.all(px[report.BAR_TOP + 3 * report.BAR_ROW] == 0, axis=-1)
  assert axis.sum() >= lengths[0]
  ticks = np.all(px[report.BAR_TOP + 3 * report.BAR_ROW + 4] == 0, axis=-1)
  assert 3 <= ticks.sum() <= 10  # 0, 10, 20, 30
  with Image.open(paths["contact:skimage camera"]) as sheet:
    assert sheet.size == (4 + 5 * 100, 30 + 3 * 100 + 4)  # 12 thumbnails, 5 columns
    tile = np.asarray(sheet.convert("L"))[34:34 + 96, 4:4 + 96]
    assert tile.std() > 20  # a real image, not the background
  with Image.open(paths["contact:broken"]) as sheet:
    assert sheet.size[1] == 30 + 100 + 4  # "no samples", one row high

  # A source whose counts do not add up is named.
  bad = dict(SUMMARY, sources=dict(SUMMARY["sources"], broken=dict(
      SUMMARY["sources"]["broken"], inputs=5)))
  md = open(report.write_report(bad, {}, tmp_path / "bad")["markdown"]).read()
  assert "DO NOT RECONCILE for: broken." in md
  with pytest.raises(ValueError, match="lacks"):
    report.write_report({"sources": {"x": {"inputs": 1}}}, {}, tmp_path / "x")
