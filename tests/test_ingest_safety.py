"""Ingestion faced with a careless --out, hostile headers and a SIGKILL:
nothing it did not write is deleted, memory follows the cap and not the
header's claims, every input is counted with a reason, no worker outlives it."""
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from data_pipeline import shards
from data_pipeline.ingest import __main__ as cli
from data_pipeline.ingest import pipeline
from data_pipeline.ingest.spec import parse_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNI = os.path.join(os.path.dirname(__import__("nilearn").__file__), "datasets", "data",
                   "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def _photos(folder, n=3):
  folder.mkdir(parents=True, exist_ok=True)
  for name, img in list({"cell": skdata.cell(), "retina": skdata.retina(),
                         "ihc": skdata.immunohistochemistry()}.items())[:n]:
    Image.fromarray(img).save(folder / f"{name}.png")
  return folder


def _spec(path, reader="image", **source):
  return {"output": {"shard_mb": 0.5}, "dedup": {"exact": True, "near_threshold": 6},
          "sources": [{"name": "src", "path": str(path), "reader": reader, **source}]}


def _run_cli(tmp_path, doc, out, *extra):
  spec = tmp_path / "spec.json"
  spec.write_text(json.dumps(doc))
  return cli.main([f"--spec={spec}", f"--out={out}", "--workers=0", "--quiet", *extra])


def _tree(folder):
  return {os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
          for d, _, files in os.walk(folder) for f in files}


# --- Fault 1: only what an ingestion wrote is removed --------------------------------

def test_overwrite_removes_only_what_ingestion_wrote(tmp_path):
  src = _photos(tmp_path / "photos")
  out = tmp_path / "out"
  assert _run_cli(tmp_path, _spec(src), out) == 0
  manifest = shards.read_manifest(out)
  # The manifest lists every file the ingestion wrote, and nothing else is there.
  assert set(_tree(out)) == set(manifest["ingest"]["files"])
  assert {"report.md", "modalities.png", "contact_src.png", ".ingest/state.json",
          "corpus-00000.array_record"} <= set(manifest["ingest"]["files"])
  # The user puts their own files beside the corpus, names an ingestion also uses.
  (out / "my_figure.png").write_bytes(b"mine")
  (out / "report.docx").write_bytes(b"mine too")
  (out / ".ingest" / "notes.txt").write_bytes(b"and this")
  (src / "retina.png").unlink()   # the corpus changes: fewer shards' worth of images
  assert _run_cli(tmp_path, _spec(src), out, "--overwrite") == 0
  after = _tree(out)
  for mine in ("my_figure.png", "report.docx", ".ingest/notes.txt"):
    assert mine in after, mine
  assert (out / "my_figure.png").read_bytes() == b"mine"
  assert set(after) - {"my_figure.png", "report.docx", ".ingest/notes.txt"} == set(
      shards.read_manifest(out)["ingest"]["files"])
  assert shards.read_manifest(out)["ingest"]["totals"]["inputs"] == 2


def test_out_mixed_with_inputs_is_refused_and_nothing_deleted(tmp_path, capsys):
  src = _photos(tmp_path / "photos")
  before = {f: (src / f).read_bytes() for f in os.listdir(src)}
  # --out is the source folder, inside it, or a folder a glob source would walk.
  for out, doc in ((src, _spec(src)), (src / "corpus", _spec(src)),
                   (tmp_path / "corpus", _spec(tmp_path / "*")),
                   (tmp_path / "c2", _spec(str(tmp_path) + "/**/*.png"))):
    assert _run_cli(tmp_path, doc, out, "--overwrite") == 2, out
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "nothing deleted" in err, err
    assert "input" in err or "inside source" in err
  assert {f: (src / f).read_bytes() for f in os.listdir(src)} == before
  assert not (src / "corpus").exists() and not (tmp_path / "corpus").exists()
  # A glob that cannot take the outputs leaves a sibling --out alone.
  assert _run_cli(tmp_path, _spec(str(src) + "/*.png"), tmp_path / "ok") == 0


def test_non_empty_folder_no_ingestion_wrote_is_refused(tmp_path, capsys):
  src = _photos(tmp_path / "photos", n=1)
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "my_figure.png").write_bytes(b"mine")
  (foreign / "report.md").write_bytes(b"my notes")
  # A shard folder written by something else (manifest.json without an ingestion's list).
  other = tmp_path / "other"
  from data_pipeline import records
  shards.write_shards([records.make_record(skdata.cell(), {"source": "s"})], other, "t",
                      records_per_shard=4)
  for out in (foreign, other):
    before = _tree(out)
    for extra in ((), ("--overwrite",)):
      assert _run_cli(tmp_path, _spec(src), out, *extra) == 2
      err = capsys.readouterr().err.strip()
      assert str(out) in err and "no ingestion wrote it" in err and len(err.splitlines()) == 1
      assert _tree(out) == before
  # An empty folder is fine.
  (tmp_path / "empty").mkdir()
  assert _run_cli(tmp_path, _spec(src), tmp_path / "empty") == 0


def test_interrupted_before_first_shard_is_still_ours(tmp_path):
  """A run killed before its first shard left state.json: the re-run resumes."""
  src = _photos(tmp_path / "photos")
  spec = parse_spec(_spec(src))
  out = tmp_path / "out"
  with pytest.raises(pipeline.Interrupted):
    pipeline.ingest(spec, str(out), progress=False, stop_after_shards=0)
  assert pipeline._owned_files(str(out)) is not None
  assert pipeline.ingest(spec, str(out), progress=False)["num_records"] == 3


# --- Fault 4: volumes keep their slices unless near dedup is asked for -----------------

def test_volume_sources_default_to_exact_only_dedup(tmp_path):
  """The README's example: near_threshold = 6 and the MNI brain, axial slices."""
  doc = _spec(MNI, reader="nifti", options={"axes": [2], "stride": 2, "skip_empty": True})  # as in README
  m = pipeline.ingest(parse_spec(doc), str(tmp_path / "default"), progress=False)
  c = m["ingest"]["per_source"]["src"]
  assert c["near_duplicates"] == 0 and c["written"] == c["inputs"] >= 40, c
  assert m["ingest"]["dedup_used"]["src"].startswith("exact only, default for nifti")
  md = open(tmp_path / "default" / "report.md").read()
  assert "| Dedup |" in md and "exact only, default for nifti" in md
  # Opting in (per source) brings near dedup back: that is what dropped the slices.
  doc["sources"][0]["dedup"] = "all"
  m = pipeline.ingest(parse_spec(doc), str(tmp_path / "all"), progress=False)
  c2 = m["ingest"]["per_source"]["src"]
  assert c2["near_duplicates"] >= 10 and c2["inputs"] == c["inputs"]
  assert m["ingest"]["dedup_used"]["src"] == "exact + near (pHash within 6 bits), set in the spec"
  # Images keep near dedup by default, and "auto" decides per file.
  spec = parse_spec({**doc, "sources": [{"name": "a", "path": str(tmp_path), "reader": "auto"}]})
  assert spec.sources[0].dedup_mode("x.png")[0] == "all"
  assert spec.sources[0].dedup_mode("x.nii.gz")[0] == "exact"


# --- Fault 14: hostile headers --------------------------------------------------------

def _rle_dicom(path, rows, cols):
  """A tiny RLE DICOM whose header claims rows x cols 8-bit pixels."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.encaps import encapsulate
  from pydicom.uid import RLELossless, generate_uid
  meta = FileMetaDataset()
  meta.TransferSyntaxUID = RLELossless
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
  meta.MediaStorageSOPInstanceUID = generate_uid()
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
  ds.Modality, ds.Rows, ds.Columns = "OT", rows, cols
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.BitsAllocated = ds.BitsStored = 8
  ds.HighBit, ds.PixelRepresentation = 7, 0
  segment = struct.pack("<16I", 1, 64, *[0] * 14) + bytes([0x81, 0]) * 4  # 4 runs of zeros
  ds.PixelData = encapsulate([segment])
  ds["PixelData"].VR = "OB"
  ds.save_as(path, enforce_file_format=True)


def _nifti_gz(path, shape, body_bytes):
  """A .nii.gz whose header claims `shape` (uint8), with `body_bytes` of zeros."""
  hdr = nib.Nifti1Header()
  hdr.set_data_shape(shape)
  hdr.set_data_dtype(np.uint8)
  hdr["vox_offset"] = 352
  chunk = bytes(1 << 24)
  with gzip.open(path, "wb", compresslevel=6) as f:
    f.write(hdr.binaryblock + b"\0" * 4)
    while body_bytes:
      f.write(chunk[:min(body_bytes, len(chunk))])
      body_bytes -= min(body_bytes, len(chunk))


_PEAK = """
import json, sys
from data_pipeline.ingest import pipeline
from data_pipeline.ingest.spec import load_spec
import pydicom, nibabel, PIL.Image  # the readers' libraries: part of the baseline
def peak():
  # This process's own high-water mark. Not getrusage's ru_maxrss: Linux carries
  # the forking parent's (pytest's, GBs late in a suite) across exec into it.
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
base = peak()
m = pipeline.ingest(load_spec(sys.argv[1]), sys.argv[2], workers=0, progress=False)
print(json.dumps({"base_mb": base, "peak_mb": peak(), "manifest": m}))
"""


def test_hostile_headers_rejected_before_decoding_in_bounded_memory(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  _rle_dicom(raw / "bomb30k.dcm", 30000, 30000)
  _rle_dicom(raw / "bomb64k.dcm", 65535, 65535)
  _nifti_gz(raw / "claims4096.nii.gz", (4096,) * 3, 1000)     # header + a cut-off body
  _nifti_gz(raw / "zeros640.nii.gz", (640,) * 3, 640 ** 3)     # a 0.25 MB gzip bomb
  _nifti_gz(raw / "zeros32.nii.gz", (32,) * 3, 32 ** 3)        # in the cap, but blank
  assert max(os.path.getsize(raw / f) for f in os.listdir(raw)) < 1 << 20
  Image.fromarray(skdata.cell()).save(raw / "cell.png")        # one good input
  spec = tmp_path / "spec.json"
  spec.write_text(json.dumps({"output": {"shard_mb": 1}, "sources": [
      {"name": "dcm", "path": str(raw / "*.dcm"), "reader": "dicom"},
      {"name": "nii", "path": str(raw / "*.nii.gz"), "reader": "nifti"},
      {"name": "png", "path": str(raw / "*.png"), "reader": "image"}]}))
  t0 = time.perf_counter()
  run = subprocess.run([sys.executable, "-c", _PEAK, str(spec), str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  elapsed = time.perf_counter() - t0
  result = json.loads(run.stdout.splitlines()[-1])
  # Above the imports' own memory (which varies with the machine and its load):
  # was 1.8 GB, then 8 GiB tried, and 2.1 GB for the zeros.
  assert result["peak_mb"] - result["base_mb"] < 300, result
  assert elapsed < 180, elapsed   # the 640^3 zeros took 15 s alone; loose for busy CI
  m = result["manifest"]
  totals = m["ingest"]["totals"]
  assert totals["inputs"] == 6 and totals["written"] == 1 and totals["rejected"] == 5
  assert totals["inputs"] == sum(totals[k] for k in pipeline.COUNTERS[1:])
  rejects = {os.path.basename(r["path"]): r["reason"]
             for r in map(json.loads, open(tmp_path / "out" / "rejects.jsonl"))}
  assert set(rejects) == {"bomb30k.dcm", "bomb64k.dcm", "claims4096.nii.gz",
                          "zeros640.nii.gz", "zeros32.nii.gz"}
  claims = {"bomb30k.dcm": "30000x30000", "bomb64k.dcm": "65535x65535",
            "claims4096.nii.gz": "4096x4096x4096", "zeros640.nii.gz": "640x640x640"}
  for name, reason in rejects.items():
    assert reason.startswith(str(raw / name) + ": ") and len(reason) > len(str(raw / name)) + 20
    if name in claims:
      assert claims[name] in reason and "max_pixels" in reason, reason
  assert "no slice kept" in rejects["zeros32.nii.gz"]
  # Raising the cap is how a user reads a file that big: the option is checked.
  doc = json.loads(spec.read_text())
  doc["sources"][1]["options"] = {"max_pixels": 0}
  with pytest.raises(ValueError, match=r"sources\[1\].options.max_pixels"):
    parse_spec(doc)


# --- Fault 15: no worker outlives a SIGKILLed ingestion --------------------------------

def _children(pid):
  out = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        stat = open(f"/proc/{entry}/stat").read()
      except OSError:
        continue
      if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
        out.append(int(entry))
  return out


def _alive(pid):
  try:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_ingestion_leaves_no_workers(tmp_path):
  rng = np.random.default_rng(0)
  src = tmp_path / "noise"
  src.mkdir()
  for i in range(300):  # far more than 2 workers finish before the kill
    Image.fromarray(rng.integers(0, 256, (192, 192), np.uint8)).save(src / f"{i:03d}.png")
  spec = tmp_path / "spec.json"
  spec.write_text(json.dumps(_spec(src)))
  p = subprocess.Popen([sys.executable, "-m", "data_pipeline.ingest", f"--spec={spec}",
                        f"--out={tmp_path / 'out'}", "--workers=2", "--quiet"], cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "out").glob("corpus-*")):
      time.sleep(0.1)   # workers are up and have sent results
    children = _children(p.pid)
    assert p.poll() is None and len(children) >= 2, children
    p.kill()
    p.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(map(_alive, children)):
      time.sleep(0.1)
    assert not [c for c in children if _alive(c)]
  finally:
    p.kill()
    for c in _children(p.pid) + locals().get("children", []):
      if _alive(c):
        os.kill(c, signal.SIGKILL)
