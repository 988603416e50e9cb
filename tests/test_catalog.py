"""The BioVFM-21M catalog: its 61 entries, the rebuild of miniature copies of
several sources in their released layouts, named subsets, and the HDF5
reader's memory on a big file."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from data_pipeline import records, selection, shards
from data_pipeline.catalog import catalog as catalog_lib
from data_pipeline.catalog import rebuild
from data_pipeline.ingest import __main__ as ingest_cli
from data_pipeline.readers import arrays
from data_pipeline.readers import registry as readers
from test_ingest_readers import write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED_TOTAL = 21_472_715  # PAPER.md: the corpus' image count
LARGE = ("RP3D-DiagDS", "ULS23", "SAM-Med2D-20M", "FastMRI", "HCP", "RadImageNet", "Quilt-1M",
         "ISIC-2024", "VinDr-Multiphase", "MIMIC-CXR", "PatchCamelyon", "CheXpert", "PadChest",
         "EyePACS", "NCT-CRC-HE-100K", "Endo-FM", "Kvasir-Capsule", "ChestXray-14")


# --- the catalog itself -------------------------------------------------------------

def test_catalog_holds_all_61_sources_with_working_presets():
  cat = catalog_lib.load("biovfm21m")
  assert len(cat.entries) == 61
  assert cat.total_images == PUBLISHED_TOTAL
  assert len({e.key for e in cat.entries}) == 61
  large = sum(cat.entry(n).images for n in LARGE)
  assert large / PUBLISHED_TOTAL > 0.95  # the sources the issue asks exact presets for
  for e in cat.entries:
    assert e.reader in readers.READERS, e.name
    readers.validate_options(e.reader, e.options, e.name)
    assert e.access in catalog_lib.ACCESS and e.url.startswith("http"), e.name
    assert e.preset in ("documented", "guess") and (e.preset == "documented" or e.notes)
    for p in e.patterns:  # patterns expand without error on an empty folder
      with pytest.raises(FileNotFoundError):
        readers.files_for(os.path.join(ROOT, "no-such-folder", p), e.reader)
    assert e.policy()
  assert {m for e in cat.entries for m in e.modality} == set(catalog_lib.MODALITIES)
  us = sum(cat.entry(n).images for n in cat.subsets["us_only"]["sources"])
  assert us == 59_981  # PAPER.md's 0.06M ultrasound-only corpus


def test_readme_table_is_the_catalog():
  text = open(os.path.join(ROOT, "README.md")).read()
  section = text.split("## Rebuild the BioVFM-21M corpus")[1].split("\n## ")[0]
  rows = [l.split(" | ") for l in section.splitlines() if l.startswith("| [")]
  cat = catalog_lib.load()
  assert [(r[0].split("](")[0][3:], r[2], r[3]) for r in rows] == [
      (e.name, f"{e.images:,}", e.access) for e in cat.entries]
  assert f"**{PUBLISHED_TOTAL:,}**" in section


@pytest.mark.parametrize("change, message", [
    ({"reader": "pdf"}, r"reader='pdf'; known"),
    ({"options": {"low_pct": 200}}, r"\.options\.low_pct: must be a percentile"),
    ({"patterns": ["/abs/*.png"]}, r"must be a relative glob"),
    ({"modality": ["x-ray"]}, r"\.modality: \['x-ray'\] not among"),
    ({"access": "free"}, r"access='free'; one of"),
    ({"preset": "guess"}, r"a guessed preset needs notes"),
    ({"images": -3}, r"\.images=-3 must be a positive integer"),
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
])
def test_catalog_errors_name_the_file_and_entry(tmp_path, change, message):
  entry = {"name": "Tiny", "modality": ["CT"], "year": 2020, "images": 3,
           "url": "https://example.org", "access": "open", "reader": "image",
           "patterns": ["*.png"], "preset": "documented", **change}
  lines = ["[[source]]"]
  for k, v in entry.items():
    lines.append(f"{k} = {json.dumps(v) if not isinstance(v, dict) else '{ low_pct = 200 }'}")
  path = tmp_path / "mine.toml"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=message) as e:
    catalog_lib.load(str(path))
  assert str(path) in str(e.value) and "(Tiny)" in str(e.value)


# --- miniature copies in their released layouts --------------------------------------

def _slice_image(h, w, k, rng):
  """A grey disc of varying size with texture: not empty, not a copy of another."""
  y, x = np.mgrid[:h, :w]
  disc = ((y - h / 2) ** 2 + (x - w / 2) ** 2) < (h / (3 + k % 3)) ** 2
  return disc * (1.0 + 0.2 * k) + 0.3 * rng.random((h, w))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """A root with seven catalogued sources laid out as released, one partial
  (HCP: T1w only), and one corrupt file."""
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("public")
  # FastMRI: multicoil_train/file*.h5 with k-space and the RSS reconstruction;
  # a test file (k-space only) that the preset leaves out.
  d = root / "FastMRI" / "multicoil_train"
  d.mkdir(parents=True)
  with h5py.File(d / "file1000001.h5", "w") as f:
    f["kspace"] = np.zeros((5, 2, 8, 8), np.complex64)
    f["reconstruction_rss"] = np.stack(
        [_slice_image(40, 40, k, rng) for k in range(5)]).astype(np.float32) * 1e-4
  (root / "FastMRI" / "multicoil_test").mkdir()
  with h5py.File(root / "FastMRI" / "multicoil_test" / "file1000002.h5", "w") as f:
    f["kspace"] = np.zeros((5, 2, 8, 8), np.complex64)
  # PatchCamelyon: the train x file, uint8 (N, 96, 96, 3), read in parts.
  (root / "PatchCamelyon").mkdir()
  with h5py.File(root / "PatchCamelyon" / "camelyonpatch_level_2_split_train_x.h5", "w") as f:
    f.create_dataset("x", data=rng.integers(0, 256, (150, 96, 96, 3), dtype=np.uint8),
                     chunks=(1, 96, 96, 3), compression="gzip")
  # EchoNet-Dynamic: Videos/*.avi, 120 frames; the preset takes every 50th.
  (root / "EchoNet-Dynamic" / "Videos").mkdir(parents=True)
  frames = [np.full((64, 64, 3), 0, np.uint8) for _ in range(120)]
  for k, fr in enumerate(frames):
    fr[8 + k // 4: 30 + k // 4, 10:50] = 200
  write_video(root / "EchoNet-Dynamic" / "Videos" / "0X1A0A263B22CCD966.avi", frames,
              "mpeg4", "yuv420p", "rgb24")
  # VinDr-Multiphase: a DICOM CT series study/series/instance.dcm.
  series = root / "VinDr-Multiphase" / "1.2.3" / "1.2.3.4"
  series.mkdir(parents=True)
  for k in range(3):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = np.roll(ds.pixel_array, 6 * k, axis=0).tobytes()  # neighbouring slices
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = k + 1
    ds.save_as(series / f"{k:03d}.dcm")
  # HCP: one subject's unprocessed T1w (its T2w is missing: a partial copy).
  t1 = root / "HCP" / "100307" / "unprocessed" / "3T" / "T1w_MPR1"
  t1.mkdir(parents=True)
  vol = np.stack([_slice_image(24, 20, k, rng) for k in range(16)], axis=-1) * 800
  nib.save(nib.Nifti1Image(vol.astype(np.int16), np.diag([0.7, 0.7, 0.7, 1])),
           str(t1 / "100307_3T_T1w_MPR1.nii.gz"))
  # PadChest: numbered folders of 16-bit grey PNGs, one of them truncated.
  (root / "PadChest" / "0").mkdir(parents=True)
  for k in range(3):
    img = (_slice_image(48, 40, k, rng) * 20000).astype(np.uint16)
    Image.fromarray(img).save(root / "PadChest" / "0" / f"2161_{k:02d}-094-102.png")
  good = (root / "PadChest" / "0" / "2161_00-094-102.png").read_bytes()
  (root / "PadChest" / "0" / "2161_99-094-102.png").write_bytes(good[:len(good) // 2])
  # ISIC-2024: train-image/image/ISIC_*.jpg, colour dermoscopy crops.
  (root / "ISIC-2024" / "train-image" / "image").mkdir(parents=True)
  for k in range(4):
    rgb = np.zeros((60, 70, 3), np.uint8)
    rgb[..., 0] = 180 + 10 * k
    rgb[..., 1] = (_slice_image(60, 70, k, rng) * 60).clip(0, 255)
    rgb[..., 2] = 90
    Image.fromarray(rgb).save(root / "ISIC-2024" / "train-image" / "image" /
                              f"ISIC_{k:07d}.jpg", quality=95)
  # An empty folder: a source present by name with no files of its layout.
  (root / "ULS23").mkdir()
  return root


EXPECTED = {  # source: (files found, images written, rejected, modality, anatomy)
    "FastMRI": (1, 5, 0, "MR", "knee, brain"),
    "PatchCamelyon": (1, 150, 0, "microscopy", "lymph node"),
    "EchoNet-Dynamic": (1, 3, 0, "ultrasound", "heart"),
    "VinDr-Multiphase": (3, 3, 0, "CT", "abdomen"),
    "HCP": (1, None, 0, "MR", "brain"),
    "PadChest": (4, 3, 1, "X-ray", "chest"),
    "ISIC-2024": (4, 4, 0, "dermoscopy", "skin"),
}


@pytest.fixture(scope="module")
def rebuilt(sources, tmp_path_factory):
  out = tmp_path_factory.mktemp("corpus")
  mp = pytest.MonkeyPatch()
  mp.setattr(arrays, "PART_IMAGES", 64)  # 150 patches -> 3 inputs (parts)
  try:
    manifest, table = rebuild.rebuild(catalog_lib.load(), str(sources), str(out), workers=2,
                                      progress=False)
  finally:
    mp.undo()
  return out, manifest, table


def test_rebuild_ingests_each_found_source_with_its_preset(rebuilt):
  out, manifest, _ = rebuilt
  per = manifest["ingest"]["per_source"]
  assert set(per) == set(EXPECTED)
  for name, (files, written, rejected, _, _) in EXPECTED.items():
    assert manifest["ingest"]["files_per_source"][name] == files, name
    if written is not None:
      assert per[name]["written"] == written, (name, per[name])
    assert per[name]["rejected"] == rejected, name
  # HCP: the volume's three planes, slices that are not empty
  assert 16 < per["HCP"]["written"] <= 24 + 20 + 16
  seen = {}
  data = __import__("grain").sources.ArrayRecordDataSource(
      [str(out / s["file"]) for s in manifest["shards"]])
  for i in range(len(data)):
    pixels, header = records.read_record(data[i])
    seen.setdefault(header["source"], []).append((pixels, header))
  for name, (_, _, _, modality, anatomy) in EXPECTED.items():
    for pixels, header in seen[name]:
      assert (header["modality"], header["anatomy"]) == (modality, anatomy), header
  pcam = [h["index"] for _, h in seen["PatchCamelyon"]]
  assert sorted(i for _, i in pcam) == list(range(150))  # every patch, once, from 3 parts
  assert seen["PatchCamelyon"][0][0].shape == (96, 96, 3)
  assert sorted(h["index"] for _, h in seen["EchoNet-Dynamic"]) == [0, 50, 100]
  fast = seen["FastMRI"][0][1]
  assert fast["index"][0] == "reconstruction_rss" and "float32 window" in fast["transform"]
  assert all("I;16" in h["transform"] for _, h in seen["PadChest"])  # 16-bit, scaled
  assert all(p.dtype == np.uint8 for name in seen for p, _ in seen[name])


def test_catalog_report_lists_every_source_found_or_not(rebuilt):
  out, manifest, table = rebuilt
  with open(out / rebuild.REPORT) as f:
    rows = {r["source"]: r for r in csv.DictReader(f)}
  assert len(rows) == 61 and [r["source"] for r in table] == list(rows)
  assert rebuild.REPORT in manifest["ingest"]["files"]  # owned: --overwrite removes it
  pad = rows["PadChest"]
  assert pad["status"] == "present"
  assert (int(pad["files_found"]), int(pad["written"]), int(pad["rejected"])) == (4, 3, 1)
  assert float(pad["ratio"]) == pytest.approx(3 / 160828, abs=1e-4)
  assert int(pad["published"]) == 160828
  hcp = rows["HCP"]
  assert hcp["status"] == "partial" and "T2w_SPC1" in hcp["missing_patterns"]
  assert rows["ULS23"]["status"] == "no files" and rows["ULS23"]["written"] == ""
  mimic = rows["MIMIC-CXR"]
  assert mimic["status"] == "absent" and mimic["access"] == "credentialed"
  assert mimic["url"] == "https://github.com/MIT-LCP/mimic-cxr"
  report = (out / "report.md").read_text()
  assert "## Catalog biovfm21m: sources found" in report
  assert "## Catalog biovfm21m: sources not ingested" in report
  assert "| MIMIC-CXR | absent | 377,110 | credentialed access" in report
  assert "7 of 61 sources found" in report


def test_rebuild_resumes_and_a_partial_selection_is_not_fatal(sources, tmp_path, capsys):
  out = tmp_path / "part"
  argv = ["--catalog=biovfm21m", f"--root={sources}", f"--out={out}", "--workers=0",
          "--quiet", "--sources=PadChest,ULS23,MIMIC-CXR"]
  assert ingest_cli.main(argv) == 0
  said = capsys.readouterr().out
  assert "1 of 3 sources ingested" in said
  first = (out / "manifest.json").read_bytes()
  assert ingest_cli.main(argv) == 0  # complete: nothing redone
  assert (out / "manifest.json").read_bytes() == first
  with open(out / rebuild.REPORT) as f:
    assert [r["status"] for r in csv.DictReader(f)] == ["present", "no files", "absent"]
  # Only absent sources: one line, exit code 2, nothing written.
  empty = tmp_path / "none"
  assert ingest_cli.main(["--catalog=biovfm21m", f"--root={sources}", f"--out={empty}",
                          "--sources=MIMIC-CXR", "--quiet"]) == 2
  assert "none of the sources asked for is under the root" in capsys.readouterr().err
  assert not empty.exists()
  assert ingest_cli.main(["--catalog=biovfm21m", f"--root={sources}", f"--out={empty}",
                          "--sources=NoSuchSet"]) == 2
  assert "'NoSuchSet' not in catalog biovfm21m" in capsys.readouterr().err


def test_list_prints_the_catalog_and_what_the_root_holds(sources, capsys):
  assert ingest_cli.main(["--catalog=biovfm21m", "--list"]) == 0
  text = capsys.readouterr().out
  assert "61 of 61 sources, 21,472,715 images published" in text
  assert "FastMRI" in text and "datasets reconstruction_rss/reconstruction_esc" in text
  assert ingest_cli.main(["--catalog=biovfm21m", "--list", f"--root={sources}",
                          "--sources=HCP,PadChest,MIMIC-CXR"]) == 0
  lines = {l.split()[0]: l for l in capsys.readouterr().out.splitlines()[2:5]}
  assert "partial" in lines["HCP"] and "absent" in lines["MIMIC-CXR"]


# --- named subsets ----------------------------------------------------------------

def test_named_subsets_per_modality_and_stratified(rebuilt, capsys):
  out, manifest, _ = rebuilt
  paths = selection.make_named_subsets(str(out), ["all"], "biovfm21m")
  said = capsys.readouterr().out
  assert "skipped subset 0.2M" in said  # 200,000 asked of a tiny corpus: said, not fatal
  names = {os.path.basename(p).split(".subset")[0] for p in paths}
  assert {"us_only", "ultrasound", "MR", "CT", "X-ray", "microscopy"} <= names
  doc = json.loads((out / "subsets" / "us_only.subset.json").read_text())
  assert doc["num_records"] == 3 and doc["by_source"] == {"EchoNet-Dynamic": {"ultrasound": 3}}
  mr = json.loads((out / "subsets" / "MR.subset.json").read_text())
  assert set(mr["by_source"]) == {"FastMRI", "HCP"}
  # The stratified draw: shares proportional to each source's records.
  index = shards.read_index(str(out))
  path = selection.make_subset(str(out), "strat", count=40, stratify="source", seed=0)
  doc = json.loads(open(path).read())
  total = len(index["source"])
  for name, counts in doc["by_source"].items():
    have = manifest["ingest"]["per_source"][name]["written"]
    assert abs(sum(counts.values()) - 40 * have / total) < 1, name
  assert doc["num_records"] == 40
  again = np.load(str(out / "subsets" / "strat.npy"))
  selection.make_subset(str(out), "strat", count=40, stratify="source", seed=0)
  assert np.array_equal(again, np.load(str(out / "subsets" / "strat.npy")))


def test_stratified_draw_within_a_source_ignores_the_other_sources():
  names = ["a", "b", "c"]
  ids = np.arange(300)
  groups = np.repeat([0, 1, 2], 100)
  one = selection.stratified_draw(ids, groups, names, 30, seed=5)
  assert [int(np.sum(groups[one] == g)) for g in range(3)] == [10, 10, 10]
  # Source b's records renumbered (another source ingested before it): same picks.
  shifted = selection.stratified_draw(ids[100:200] + 1000, groups[100:200], names, 10, seed=5)
  assert np.array_equal(shifted - 1000, one[(one >= 100) & (one < 200)])
  uneven = selection.stratified_draw(ids[:150], np.repeat([0, 1, 2], [100, 45, 5]), names,
                                     15, seed=0)
  assert len(uneven) == 15 and len(set(uneven.tolist())) == 15


# --- HDF5 memory ---------------------------------------------------------------------

def test_hdf5_reader_memory_stays_bounded_on_a_big_file(tmp_path):
  path = tmp_path / "big_recon.h5"
  n, side = 360, 512  # 360 x 512 x 512 float32: 377 MB on disk
  rng = np.random.default_rng(0)
  with h5py.File(path, "w") as f:
    ds = f.create_dataset("reconstruction_rss", (n, side, side), np.float32,
                          chunks=(1, side, side))
    for i in range(n):  # written slice by slice: the test holds one slice
      ds[i] = rng.random((side, side), np.float32)
  assert os.path.getsize(path) > 350e6
  script = textwrap.dedent(f"""
      import resource, sys
      import numpy as np, h5py, PIL.Image
      from data_pipeline.readers import registry
      base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      n = 0
      for part in registry.inputs_for({str(path)!r}, "hdf5"):
        for pixels, meta in registry.READERS["hdf5"](part, {{"skip_empty": False}}):
          n += 1
      peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      print(n, base, peak)
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
  assert out.returncode == 0, out.stderr
  count, base_kb, peak_kb = map(int, out.stdout.split())
  assert count == n
  # The file is 377 MB; reading it costs a few slices (1 MB each) beyond the imports.
  assert (peak_kb - base_kb) * 1024 < 100e6, (base_kb, peak_kb)
