"""The ingestion CLI end to end: real and generated files of every kind,
corrupt inputs, duplicates, resuming, and the shards feeding the loader."""
import glob
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from skimage import data as skdata

from data_pipeline import records, shards
from data_pipeline.ingest import pipeline
from data_pipeline.ingest.spec import load_spec, parse_spec
from data_pipeline.readers import medmnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small messy corpus: real images, a copy, a near copy, corrupt files."""
  root = tmp_path_factory.mktemp("raw")
  img = root / "photos"
  img.mkdir()
  originals = {"cell.png": skdata.cell(), "retina.png": skdata.retina(),
               "ihc.png": skdata.immunohistochemistry()}
  for name, pixels in originals.items():
    Image.fromarray(pixels).save(img / name)
  shutil.copy(img / "cell.png", img / "cell_copy.png")                   # exact duplicate
  near = Image.fromarray(skdata.retina()).resize((400, 400), Image.Resampling.BILINEAR)
  near.save(img / "retina_small.jpg", quality=80)                       # near duplicate
  tiff16 = (np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 13)
  Image.fromarray(tiff16).save(img / "ramp16.tif")                       # 16-bit TIFF
  Image.fromarray(skdata.microaneurysms()).save(img / "micro.bmp")
  good = open(img / "ihc.png", "rb").read()
  open(img / "truncated.png", "wb").write(good[:len(good) // 3])         # corrupt
  open(img / "empty.png", "wb").close()                                   # corrupt
  dcm = root / "dicom"
  dcm.mkdir()
  for name in ("CT_small.dcm", "MR_small.dcm"):
    shutil.copy(get_testdata_file(name), dcm / name)
  shutil.copy(get_testdata_file("rtplan.dcm"), dcm / "plan_no_pixels.dcm")  # corrupt
  nii = root / "nifti"
  nii.mkdir()
  vol = np.zeros((24, 20, 6), np.float32)
  vol[4:20, 4:16] = np.linspace(0, 500, 16 * 12 * 6).reshape(16, 12, 6)
  nib.save(nib.Nifti1Image(vol, np.eye(4)), nii / "vol.nii.gz")
  raw = open(nii / "vol.nii.gz", "rb").read()
  open(nii / "broken.nii", "wb").write(b"\x00" * 100 + raw[100:200])     # corrupt
  npz = root / "breastmnist.npz"
  medmnist.make_synthetic_npz(npz, "breastmnist", 28, counts=(12, 3, 3), seed=0)
  return root, originals


def spec_doc(root, **output):
  return {
      "output": {"shard_mb": 0.05, **output},
      "dedup": {"exact": True, "near_threshold": 8},
      "sources": [
          {"name": "photos", "path": str(root / "photos"), "reader": "image",
           "modality": "microscopy"},
          {"name": "scans", "path": str(root / "dicom"), "reader": "dicom",
           "options": {"window": "tags"}},
          {"name": "volumes", "path": str(root / "nifti"), "reader": "nifti",
           "modality": "MR", "anatomy": "brain", "options": {"axes": [2]},
           "dedup": "exact"},   # neighbouring slices are near copies by nature
          {"name": "breast", "path": str(root / "breastmnist.npz"), "reader": "medmnist",
           "options": {"splits": ["train"]}},
      ]}


def read_all(out):
  manifest = shards.read_manifest(out)
  out_records = []
  for s in manifest["shards"]:
    from array_record.python.array_record_module import ArrayRecordReader
    r = ArrayRecordReader(os.path.join(out, s["file"]))
    out_records += [records.read_record(x) for x in r.read_all()]
    r.close()
  return manifest, out_records


def test_ingest_counts_reconcile_and_nothing_is_lost(corpus, tmp_path):
  root, originals = corpus
  out = str(tmp_path / "out")
  manifest = pipeline.ingest(parse_spec(spec_doc(root)), out, workers=0, progress=False)
  per = manifest["ingest"]["per_source"]
  for name, c in per.items():
    assert c["inputs"] == (c["written"] + c["rejected"] + c["exact_duplicates"]
                           + c["near_duplicates"]), name
  # photos: 8 files -> 5 written, truncated + empty rejected, 1 exact + 1 near dup.
  assert per["photos"] == {"inputs": 9, "written": 5, "rejected": 2, "exact_duplicates": 1,
                           "near_duplicates": 1}
  assert per["scans"]["rejected"] == 1 and per["scans"]["written"] == 2
  assert per["volumes"]["rejected"] == 1 and per["volumes"]["written"] == 6
  assert per["breast"]["written"] == 12
  rejects = [json.loads(x) for x in open(os.path.join(out, "rejects.jsonl"))]
  reasons = {os.path.basename(r["path"]): r["reason"] for r in rejects}
  assert set(reasons) == {"truncated.png", "empty.png", "plan_no_pixels.dcm", "broken.nii"}
  assert "empty file" in reasons["empty.png"] and "truncated" in reasons["truncated.png"]
  assert "no pixel data" in reasons["plan_no_pixels.dcm"]
  dups = [json.loads(x) for x in open(os.path.join(out, "duplicates.jsonl"))]
  assert sorted((os.path.basename(d["path"]), d["reason"].split(" (")[0]) for d in dups) == [
      ("cell_copy.png", "exact duplicate"), ("retina_small.jpg", "near duplicate")]

  manifest2, recs = read_all(out)
  assert len(recs) == manifest["num_records"] == 25 and manifest["num_shards"] > 3
  for s in manifest["shards"]:   # checksums and the size bound hold
    assert shards._sha256(os.path.join(out, s["file"])) == s["sha256"]
  for pixels, h in recs:
    assert {"source", "modality", "anatomy", "path", "index", "orig_size",
            "transform"} <= set(h)
  by_path = {os.path.basename(h["path"]): (p, h) for p, h in recs if h["source"] == "photos"}
  np.testing.assert_array_equal(by_path["cell.png"][0], originals["cell.png"])  # lossless
  ct = [h for _, h in recs if h["source"] == "scans"]
  assert {h["modality"] for h in ct} == {"CT", "MR"}    # from the DICOM tags
  assert manifest["modalities"]["MR"] == 7 and manifest["modalities"]["microscopy"] == 5
  for name in ("report.md", "report.html", "modalities.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert len(glob.glob(os.path.join(out, "contact_*.png"))) == 4
  # A second run of a finished ingestion does nothing.
  assert pipeline.ingest(parse_spec(spec_doc(root)), out, progress=False) == manifest


def test_resize_and_jpeg_storage(corpus, tmp_path):
  root, originals = corpus
  doc = spec_doc(root, resize_shorter=32, format="jpeg", jpeg_quality=90)
  doc["sources"] = doc["sources"][:1]
  pipeline.ingest(parse_spec(doc), str(tmp_path), progress=False)
  _, recs = read_all(str(tmp_path))
  for pixels, h in recs:
    assert min(pixels.shape[:2]) == 32 and "shorter side" in h["transform"]
    ratio = h["orig_size"][1] / h["orig_size"][0]
    assert abs(pixels.shape[1] / pixels.shape[0] - ratio) < 0.1


def test_interrupted_ingestion_resumes_to_identical_shards(corpus, tmp_path):
  root, _ = corpus
  spec = parse_spec(spec_doc(root))
  ref = pipeline.ingest(spec, str(tmp_path / "ref"), progress=False)
  with pytest.raises(pipeline.Interrupted):
    pipeline.ingest(spec, str(tmp_path / "cut"), progress=False, stop_after_shards=2)
  kept = sorted(os.listdir(tmp_path / "cut"))
  mtimes = {f: os.path.getmtime(tmp_path / "cut" / f) for f in kept if f.endswith(".array_record")}
  assert len(mtimes) == 2
  resumed = pipeline.ingest(spec, str(tmp_path / "cut"), workers=2, progress=False)
  assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in ref["shards"]]
  assert resumed["ingest"]["per_source"] == ref["ingest"]["per_source"]
  for f, t in mtimes.items():   # finished shards were kept, not redone
    assert os.path.getmtime(tmp_path / "cut" / f) == t
  for name in ("rejects.jsonl", "duplicates.jsonl"):
    assert open(tmp_path / "cut" / name).read() == open(tmp_path / "ref" / name).read()
  # Another spec in the same folder is refused, not mixed in.
  other = spec_doc(root)
  other["dedup"]["near_threshold"] = 2
  with pytest.raises(FileExistsError, match="another spec"):
    pipeline.ingest(parse_spec(other), str(tmp_path / "cut"), progress=False)


def test_spec_errors_name_the_key(corpus, tmp_path):
  root, _ = corpus
  bad = spec_doc(root)
  bad["sources"][1]["reader"] = "dcm"
  with pytest.raises(ValueError, match=r"sources\[1\].reader='dcm'"):
    parse_spec(bad)
  bad = spec_doc(root)
  bad["sources"][2]["options"]["stride"] = 0
  with pytest.raises(ValueError, match=r"sources\[2\].options.stride"):
    parse_spec(bad)
  bad = spec_doc(root)
  bad["output"]["fromat"] = "png"
  with pytest.raises(ValueError, match="fromat"):
    parse_spec(bad)
  (tmp_path / "s.toml").write_text('[output]\nformat = "gif"\n[[sources]]\nname="a"\npath="/x"\n')
  with pytest.raises(ValueError, match="output.format"):
    load_spec(str(tmp_path / "s.toml"))


@pytest.mark.slow
def test_cli_killed_mid_run_then_resumed(corpus, tmp_path):
  """SIGKILL during a real CLI run (2 workers), then the same command again."""
  root, _ = corpus
  spec = tmp_path / "corpus.json"
  doc = spec_doc(root)
  doc["output"]["shard_mb"] = 0.01
  spec.write_text(json.dumps(doc))
  cmd = [sys.executable, "-m", "data_pipeline.ingest", f"--spec={spec}", "--workers=2"]
  ref = subprocess.run(cmd + [f"--out={tmp_path / 'ref'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-2000:]
  assert "inputs =" in ref.stdout
  p = subprocess.Popen(cmd + [f"--out={tmp_path / 'cut'}"], cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  import time
  deadline = time.time() + 300
  while time.time() < deadline and len(glob.glob(str(tmp_path / "cut" / "*.array_record"))) < 3:
    time.sleep(0.05)
  p.kill()
  p.wait()
  assert not os.path.exists(tmp_path / "cut" / "manifest.json")  # it was killed mid-run
  again = subprocess.run(cmd + [f"--out={tmp_path / 'cut'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  a = shards.read_manifest(tmp_path / "ref")
  b = shards.read_manifest(tmp_path / "cut")
  assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
  bad = subprocess.run([sys.executable, "-m", "data_pipeline.ingest", "--spec=/nope.toml",
                        f"--out={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 2 and "no spec file" in bad.stderr
