"""Ingestion readers: real shipped files and generated ones in every format, pixels
checked against the source arrays after the documented transform, corrupt inputs
rejected with a reason that names the file."""
import gzip
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from data_pipeline.readers import registry as readers
from data_pipeline.readers import medmnist
from data_pipeline.readers.common import ReaderError

SKIMAGE_DATA = os.path.join(os.path.dirname(__import__("skimage").__file__), "data")
NILEARN_DATA = os.path.join(os.path.dirname(__import__("nilearn").__file__), "datasets", "data")
BASE_META = {"path", "index", "orig_size", "transform"}


def window(values, lo, hi):
  """Reference linear window [lo, hi] -> [0, 255], in float64."""
  values = np.asarray(values, np.float64)
  return np.rint(np.clip((values - lo) / (hi - lo) * 255.0, 0, 255)).astype(np.uint8)


def pct_window(values, low=0.5, high=99.5):
  return window(values, *np.percentile(np.asarray(values, np.float64), [low, high]))


def dicom_linear(values, center, width):
  """PS3.3 C.11.2.1.2 LINEAR window onto 0..255."""
  y = (np.asarray(values, np.float64) - (center - 0.5)) / (width - 1) + 0.5
  return np.rint(np.clip(y, 0, 1) * 255).astype(np.uint8)


def assert_close(actual, expected, tol=1):
  assert actual.shape == expected.shape and actual.dtype == np.uint8
  assert np.abs(actual.astype(int) - expected.astype(int)).max() <= tol


def read(reader, path, **options):
  return list(readers.READERS[reader](str(path), options))


def write_dicom(path, frames, photometric="MONOCHROME2", **tags):
  """A minimal Part 10 DICOM file holding uint16 `frames` ((H, W) or (F, H, W))."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
  ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
  ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  ds.Modality = tags.pop("Modality", "DX")
  if frames is not None:
    ds.set_pixel_data(np.asarray(frames, np.uint16), photometric, 12)
  else:
    ds.PhotometricInterpretation, ds.Rows, ds.Columns = photometric, 4, 4
  for k, v in tags.items():
    setattr(ds, k, v)
  ds.save_as(str(path), enforce_file_format=True)
  return str(path)


def write_video(path, frames, codec, pix_fmt, in_fmt, **codec_options):
  av = pytest.importorskip("av")
  with av.open(str(path), "w") as c:
    s = c.add_stream(codec, rate=10)
    s.height, s.width = frames[0].shape[:2]
    s.pix_fmt = pix_fmt
    s.options = codec_options
    for f in frames:
      for packet in s.encode(av.VideoFrame.from_ndarray(f, format=in_fmt)):
        c.mux(packet)
    for packet in s.encode():
      c.mux(packet)
  return str(path)


# --- registry and options ---------------------------------------------------------

def test_registry_and_option_defaults():
  assert set(readers.READERS) == {"image", "dicom", "nifti", "medmnist", "video", "hdf5",
                                  "npy", "auto"}
  assert readers.validate_options("nifti", None, "x") == {
      "axes": [0, 1, 2], "stride": 1, "skip_empty": True, "empty_fraction": 0.02,
      "low_pct": 0.5, "high_pct": 99.5, "volumes": "first", "square_pixels": True,
      "max_pixels": readers.MAX_PIXELS}
  assert readers.validate_options("medmnist", {"splits": ["test"]}, "x") == {
      "splits": ["test"], "flag": None}
  assert readers.validate_options("video", {"max_frames": 4}, "x") == {
      "stride": 1, "max_frames": 4}
  # "auto" takes any reader's keys.
  auto = readers.validate_options("auto", {"window": "percentile", "stride": 3}, "x")
  assert auto["window"] == "percentile" and auto["stride"] == 3 and auto["frames"] == "all"
  # Defaults are copies: changing one result leaves the next alone.
  readers.validate_options("nifti", {}, "x")["axes"].append(9)
  assert readers.validate_options("nifti", {}, "x")["axes"] == [0, 1, 2]


@pytest.mark.parametrize("reader,options,pattern", [
    ("image", {"low": 1}, r"sources\[2\]\.options: unknown option 'low' for reader 'image'; "
                          r"known options: low_pct, high_pct, frames"),
    ("image", {"frames": "last"}, r"sources\[2\]\.options\.frames: must be one of 'all', "
                                  r"'first'.*got 'last'"),
    ("image", {"low_pct": 60, "high_pct": 40}, r"sources\[2\]\.options\.low_pct: must be below"),
    ("dicom", {"window": "auto"}, r"\.window: must be one of 'tags', 'percentile'"),
    ("dicom", {"high_pct": 101}, r"\.high_pct: must be a percentile in \[0, 100\]"),
    ("nifti", {"axes": [0, 3]}, r"\.axes: must be distinct axes"),
    ("nifti", {"axes": [1, 1]}, r"\.axes: must be distinct axes"),
    ("nifti", {"axes": []}, r"\.axes: must be a non-empty list"),
    ("nifti", {"stride": 0}, r"\.stride: must be an integer >= 1"),
    ("nifti", {"stride": 1.5}, r"\.stride: must be an integer >= 1"),
    ("nifti", {"skip_empty": "yes"}, r"\.skip_empty: must be true or false"),
    ("nifti", {"empty_fraction": 2}, r"\.empty_fraction: must be a fraction"),
    ("nifti", {"volumes": 2}, r"\.volumes: must be one of 'first', 'all'"),
    ("medmnist", {"splits": ["train", "dev"]}, r"\.splits: must be distinct splits"),
    ("medmnist", {"flag": "fooMNIST"}, r"\.flag: must be a MedMNIST benchmark"),
    ("video", {"max_frames": 0}, r"\.max_frames: must be an integer >= 1"),
    ("auto", {"slices": 2}, r"unknown option 'slices' for reader 'auto'; known options: low_pct"),
])
def test_option_errors_name_where_and_key(reader, options, pattern):
  with pytest.raises(ValueError, match=pattern):
    readers.validate_options(reader, options, "sources[2].options")


def test_unknown_reader_and_options_given_to_a_reader_directly(tmp_path):
  with pytest.raises(ValueError, match=r"unknown reader 'jpeg'; known: image, dicom"):
    readers.validate_options("jpeg", {}, "sources[0].options")
  with pytest.raises(ValueError, match="must be a mapping"):
    readers.validate_options("image", ["frames"], "sources[0].options")
  path = tmp_path / "a.png"
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
  # A reader called without the driver checks its options too, naming the file.
  with pytest.raises(ValueError, match=r"a\.png\.frames: must be one of") as info:
    read("image", path, frames="some")
  assert not isinstance(info.value, ReaderError)  # a spec error, not a reject


# --- listing files ----------------------------------------------------------------

def test_files_for_walks_filters_and_expands_globs(tmp_path):
  (tmp_path / "sub" / "deeper").mkdir(parents=True)
  (tmp_path / ".cache").mkdir()
  names = ["a.png", "b.JPG", "sub/c.tif", "sub/deeper/d.bmp", "e.tiff", "f.jpeg",
           "ct.dcm", "sub/vol.nii", "sub/vol2.nii.gz", "breastmnist.npz", "clip.mp4",
           "echo.webm", "notes.txt", ".hidden.png", ".cache/g.png", "labels.csv"]
  for name in names:
    (tmp_path / name).write_bytes(b"x")
  # DICOM files often have no suffix: those are found by the magic at byte 128.
  (tmp_path / "sub" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
  (tmp_path / "sub" / "README").write_text("not dicom " * 20)

  def rel(reader, pattern=str(tmp_path)):
    return [os.path.relpath(p, tmp_path) for p in readers.files_for(pattern, reader)]
  assert rel("image") == ["a.png", "b.JPG", "e.tiff", "f.jpeg", "sub/c.tif", "sub/deeper/d.bmp"]
  assert rel("dicom") == ["ct.dcm", "sub/IM0001"]
  assert rel("nifti") == ["sub/vol.nii", "sub/vol2.nii.gz"]
  assert rel("medmnist") == ["breastmnist.npz"]
  assert rel("video") == ["clip.mp4", "echo.webm"]
  assert rel("auto") == sorted(rel("image") + rel("dicom") + rel("nifti") + rel("medmnist")
                               + rel("video"))
  # Globs: the matches are filtered like a folder's files; folders are walked.
  assert rel("image", str(tmp_path / "*")) == ["a.png", "b.JPG", "e.tiff", "f.jpeg",
                                                "sub/c.tif", "sub/deeper/d.bmp"]
  assert rel("image", str(tmp_path / "**" / "*.tif")) == ["sub/c.tif"]
  assert rel("nifti", str(tmp_path / "sub" / "vol*")) == ["sub/vol.nii", "sub/vol2.nii.gz"]
  # A file named directly is taken whatever its suffix, even with glob characters.
  assert rel("image", str(tmp_path / "notes.txt")) == ["notes.txt"]
  (tmp_path / "scan[1].png").write_bytes(b"x")
  assert rel("image", str(tmp_path / "scan[1].png")) == ["scan[1].png"]
  with pytest.raises(FileNotFoundError, match=r"scans/\*\.dcm: no file or folder matches"):
    readers.files_for(str(tmp_path / "scans" / "*.dcm"), "dicom")
  with pytest.raises(FileNotFoundError, match=r"\*\.txt: no NIfTI \(\.nii \.nii\.gz\) files"):
    readers.files_for(str(tmp_path / "*.txt"), "nifti")
  with pytest.raises(FileNotFoundError, match="missing: no such file or folder"):
    readers.files_for(str(tmp_path / "missing"), "image")
  with pytest.raises(ValueError, match="unknown reader"):
    readers.files_for(str(tmp_path), "png")


# --- images -----------------------------------------------------------------------

def test_images_8bit_png_bmp_jpeg_exact_or_close(tmp_path):
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:40, 0:56]
  grey = (xx * 3 + yy * 2).astype(np.uint8)  # smooth: JPEG keeps it well
  rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
  smooth_rgb = np.stack([grey, 255 - grey, (grey // 2 + 60).astype(np.uint8)], -1)
  Image.fromarray(grey).save(tmp_path / "grey.png")
  Image.fromarray(rgb).save(tmp_path / "rgb.png")
  Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
  Image.fromarray(smooth_rgb).save(tmp_path / "photo.jpg", quality=95,
                                     subsampling=0)
  (p, m), = read("image", tmp_path / "grey.png")
  np.testing.assert_array_equal(p, grey)
  assert set(m) == BASE_META and m["index"] == 0 and m["orig_size"] == [40, 56]
  assert m["transform"] == "none" and m["path"] == str(tmp_path / "grey.png")
  for name in ("rgb.png", "rgb.bmp"):
    (p, m), = read("image", tmp_path / name)
    np.testing.assert_array_equal(p, rgb)
  (p, m), = read("image", tmp_path / "photo.jpg")
  assert p.shape == (40, 56, 3)
  np.testing.assert_array_equal(p, np.asarray(Image.open(tmp_path / "photo.jpg")))
  assert np.abs(p.astype(int) - smooth_rgb).mean() < 1.5  # lossy, but close


def test_16bit_tiff_scaled_by_the_percentiles_given_in_options(tmp_path):
  rng = np.random.default_rng(1)
  raw = rng.integers(200, 4000, (30, 44)).astype(np.uint16)  # a 12-bit camera
  path = tmp_path / "cells16.tif"
  Image.fromarray(raw).save(path)
  (p, m), = read("image", path, low_pct=2, high_pct=98)
  assert_close(p, pct_window(raw, 2, 98))
  lo, hi = np.percentile(raw, [2, 98])
  assert f"percentile 2.0-98.0 window [{lo:g}, {hi:g}]" in m["transform"]
  (p, _), = read("image", path, low_pct=0, high_pct=100)
  assert_close(p, window(raw, raw.min(), raw.max()))


def test_multipage_tiff_all_or_first_pages(tmp_path):
  rng = np.random.default_rng(2)
  pages = [rng.integers(0, 256, (12, 18), dtype=np.uint8) for _ in range(3)]
  path = tmp_path / "stack.tif"
  Image.fromarray(pages[0]).save(path, save_all=True,
                                 append_images=[Image.fromarray(p) for p in pages[1:]])
  out = read("image", path)
  assert [m["index"] for _, m in out] == [0, 1, 2]
  for (p, _), ref in zip(out, pages):
    np.testing.assert_array_equal(p, ref)
  (p, m), = read("image", path, frames="first")
  np.testing.assert_array_equal(p, pages[0])


def test_shipped_skimage_files_match_their_decoded_arrays():
  import tifffile
  (p, m), = read("image", os.path.join(SKIMAGE_DATA, "cell.png"))
  np.testing.assert_array_equal(p, np.asarray(Image.open(os.path.join(SKIMAGE_DATA, "cell.png"))))
  (p, m), = read("auto", os.path.join(SKIMAGE_DATA, "ihc.png"))
  assert p.shape == (512, 512, 3) and m["orig_size"] == [512, 512]
  np.testing.assert_array_equal(
      p, np.asarray(Image.open(os.path.join(SKIMAGE_DATA, "ihc.png")).convert("RGB")))
  out = read("image", os.path.join(SKIMAGE_DATA, "multipage.tif"))
  ref = tifffile.imread(os.path.join(SKIMAGE_DATA, "multipage.tif"))
  assert len(out) == len(ref) == 2
  for (p, _), r in zip(out, ref):
    np.testing.assert_array_equal(p, r)


# --- DICOM ------------------------------------------------------------------------

def test_shipped_dicom_ct_and_mr_with_suggested_modality():
  ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
  (p, m), = read("dicom", get_testdata_file("CT_small.dcm"))
  assert_close(p, pct_window(hu))
  assert m["modality"] == "CT" and "anatomy" not in m and m["index"] == 0
  mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
  (p, m), = read("dicom", get_testdata_file("MR_small.dcm"))
  assert_close(p, dicom_linear(mr.pixel_array, 600, 1600))
  assert "window center=600 width=1600 (LINEAR)" in m["transform"] and m["modality"] == "MR"
  # window="percentile" ignores the tags.
  (p, m), = read("dicom", get_testdata_file("MR_small.dcm"), window="percentile")
  assert_close(p, pct_window(mr.pixel_array))
  # nibabel ships DICOM too: a 12-bit MR slice with a window in its tags.
  from nibabel.testing import data_path
  path = os.path.join(str(data_path), "0.dcm")
  ds = pydicom.dcmread(path)
  (p, m), = read("auto", path)
  assert_close(p, dicom_linear(ds.pixel_array, float(ds.WindowCenter), float(ds.WindowWidth)))


def test_shipped_multiframe_dicom_one_window_over_all_frames():
  path = get_testdata_file("rtdose.dcm")
  frames = pydicom.dcmread(path).pixel_array.astype(np.float64)
  out = read("dicom", path)
  assert [m["index"] for _, m in out] == list(range(15))
  lo, hi = np.percentile(frames, [0.5, 99.5])
  for (p, _), f in zip(out, frames):
    assert_close(p, window(f, lo, hi))
  assert len(read("dicom", path, frames="first")) == 1


def test_generated_multiframe_and_monochrome1_dicom(tmp_path):
  rng = np.random.default_rng(3)
  frames = rng.integers(0, 4096, (4, 10, 14))
  tags = dict(RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=2000, WindowWidth=3000,
              BodyPartExamined="CHEST")
  mf = write_dicom(tmp_path / "mf.dcm", frames, Modality="MR", **tags)
  out = read("dicom", mf)
  assert [m["index"] for _, m in out] == [0, 1, 2, 3]
  for (p, m), f in zip(out, frames):
    assert_close(p, dicom_linear(f * 2.0 - 1000, 2000, 3000))
    assert m["modality"] == "MR" and m["anatomy"] == "chest"
  out = read("dicom", mf, window="percentile")
  lo, hi = np.percentile(frames * 2.0 - 1000, [0.5, 99.5])
  for (p, _), f in zip(out, frames):
    assert_close(p, window(f * 2.0 - 1000, lo, hi))
  # MONOCHROME1: low values are bright, so the output is inverted.
  m1 = write_dicom(tmp_path / "m1.dcm", frames[0], "MONOCHROME1", **tags)
  (p, m), = read("dicom", m1)
  assert_close(p, 255 - dicom_linear(frames[0] * 2.0 - 1000, 2000, 3000))
  assert "MONOCHROME1 inverted" in m["transform"] and m["modality"] == "X-ray"
  # A series exported without a suffix: "auto" finds it by the DICM magic.
  os.rename(m1, tmp_path / "IM0002")
  (p2, _), = read("auto", tmp_path / "IM0002")
  np.testing.assert_array_equal(p2, p)


def test_dicom_rejects_name_file_and_reason(tmp_path):
  # pydicom's RT plan is real DICOM without an image.
  with pytest.raises(ReaderError, match=r"rtplan\.dcm: DICOM file has no pixel data"):
    read("dicom", get_testdata_file("rtplan.dcm"))
  nopix = write_dicom(tmp_path / "nopix.dcm", None)
  with pytest.raises(ReaderError, match=r"nopix\.dcm: DICOM file has no pixel data"):
    read("auto", nopix)
  data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
  (tmp_path / "cut.dcm").write_bytes(data[:len(data) // 2])
  with pytest.raises(ReaderError, match=r"cut\.dcm: cannot decode pixel data: The number of "
                                        "bytes of pixel data is less than expected"):
    read("dicom", tmp_path / "cut.dcm")
  (tmp_path / "report.dcm").write_text("patient report\n" * 20)
  with pytest.raises(ReaderError, match=r"report\.dcm: not a DICOM file"):
    read("dicom", tmp_path / "report.dcm")


def test_dicom_missing_decoder_is_a_reject_naming_the_packages():
  from pydicom.pixels import get_decoder
  path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
  if get_decoder(pydicom.dcmread(path).file_meta.TransferSyntaxUID).is_available:
    pytest.skip("a JPEG-LS decoder is installed here")
  with pytest.raises(ReaderError, match=r"jpeg_ls_lossless\.dcm: pixel data is compressed as "
                                        r"JPEG-LS.*no decoder package.*install one of.*pylibjpeg"):
    read("auto", path)


# --- NIfTI ------------------------------------------------------------------------

def test_nifti_slices_match_canonical_percentile_scaled_volume(tmp_path):
  rng = np.random.default_rng(4)
  vol = rng.normal(100, 30, (9, 11, 13)).astype(np.float32)
  path = tmp_path / "lps.nii.gz"
  # Stored LPS (x and y flipped): canonical RAS flips axes 0 and 1 back.
  nib.save(nib.Nifti1Image(vol, np.diag([-1.0, -1.0, 1.0, 1.0])), path)
  scaled = pct_window(vol, 1, 99)
  scaled_ras = scaled[::-1, ::-1, :]
  out = read("nifti", path, stride=3, skip_empty=False, low_pct=1, high_pct=99)
  assert [m["index"] for _, m in out] == (
      [[0, 0, k] for k in (0, 3, 6)] + [[0, 1, k] for k in (0, 3, 6, 9)]
      + [[0, 2, k] for k in (0, 3, 6, 9, 12)])
  for p, m in out:
    axis, k = m["index"][1:]
    ref = np.rot90(np.take(scaled_ras, k, axis=axis))
    assert_close(p, ref)
    assert m["orig_size"] == list(ref.shape) and set(m) == BASE_META
    assert "canonical RAS" in m["transform"] and "percentile 1.0-99.0" in m["transform"]
  # The flip matters: slice 0 of canonical axis 0 is the last stored one.
  assert not np.array_equal(np.rot90(scaled_ras[0]), np.rot90(scaled[0]))
  assert np.array_equal(out[0][0], np.rot90(scaled[-1, ::-1, :]))


def test_nifti_empty_slices_and_volumes(tmp_path):
  vol = np.zeros((8, 8, 6, 2), np.float32)
  vol[2:6, 2:6, 1:5, 0] = np.arange(4 * 4 * 4).reshape(4, 4, 4) + 10
  vol[..., 1] = vol[..., 0] * 3
  path = tmp_path / "fmri.nii"
  nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
  kept = [m["index"] for _, m in read("nifti", path, axes=[2])]
  assert kept == [[0, 2, k] for k in (1, 2, 3, 4)]  # blank first and last slices dropped
  assert len(read("nifti", path, axes=[2], skip_empty=False)) == 6
  both = read("nifti", path, axes=[2], volumes="all")
  assert [m["index"][0] for _, m in both] == [0] * 4 + [1] * 4
  # Each volume has its own window, so a scaled copy gives the same pixels.
  for (a, _), (b, _) in zip(both[:4], both[4:]):
    np.testing.assert_array_equal(a, b)


def test_shipped_nilearn_and_nibabel_volumes():
  path = os.path.join(NILEARN_DATA, "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
  canon = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, np.float64)
  lo, hi = np.percentile(canon, [0.5, 99.5])
  out = read("auto", path, axes=[2], stride=40, skip_empty=False)
  assert [m["index"] for _, m in out] == [[0, 2, k] for k in range(0, canon.shape[2], 40)]
  for p, m in out:
    assert_close(p, window(np.rot90(canon[:, :, m["index"][2]]), lo, hi))
  from nibabel.testing import data_path
  path = os.path.join(str(data_path), "example4d.nii.gz")
  shape = nib.load(path).shape
  out = read("nifti", path, axes=[2], volumes="all", skip_empty=False, stride=4)
  assert [m["index"] for _, m in out] == [[v, 2, k] for v in range(shape[3])
                                          for k in range(0, shape[2], 4)]


def test_nifti_broken_headers_and_truncation(tmp_path):
  good = tmp_path / "good.nii"
  noise = np.random.default_rng(6).normal(size=(6, 7, 8)).astype(np.float32)
  nib.save(nib.Nifti1Image(noise, np.eye(4)), good)
  data = bytearray(good.read_bytes())
  bad_magic = bytearray(data)
  bad_magic[344:348] = b"xxxx"
  (tmp_path / "magic.nii").write_bytes(bad_magic)
  with pytest.raises(ReaderError, match=r"magic\.nii: NIfTI header unreadable or invalid"):
    read("nifti", tmp_path / "magic.nii")
  bad_dim = bytearray(data)
  bad_dim[42:44] = (-6).to_bytes(2, "little", signed=True)  # dim[1]
  (tmp_path / "dim.nii").write_bytes(bad_dim)
  with pytest.raises(ReaderError, match=r"dim\.nii: NIfTI header gives an invalid shape"):
    read("nifti", tmp_path / "dim.nii")
  (tmp_path / "cut.nii").write_bytes(data[:len(data) - 100])
  with pytest.raises(ReaderError, match=r"cut\.nii: truncated NIfTI: the header promises "
                                        rf"{len(data)} bytes .* the file has {len(data) - 100}"):
    read("nifti", tmp_path / "cut.nii")
  (tmp_path / "notgz.nii.gz").write_bytes(bytes(data))  # named .gz, not compressed
  with pytest.raises(ReaderError, match=r"notgz\.nii\.gz: not gzip-compressed although "
                                        r"named \.gz"):
    read("auto", tmp_path / "notgz.nii.gz")
  # A gzip stream cut short, before the header ends (small file) or after.
  packed = gzip.compress(bytes(data))
  (tmp_path / "cut.nii.gz").write_bytes(packed[:len(packed) // 2])
  with pytest.raises(ReaderError, match=r"cut\.nii\.gz: truncated gzip stream"):
    read("nifti", tmp_path / "cut.nii.gz")
  big = np.random.default_rng(7).normal(size=(40, 40, 40)).astype(np.float32)
  nib.save(nib.Nifti1Image(big, np.eye(4)), tmp_path / "big.nii.gz")
  packed = (tmp_path / "big.nii.gz").read_bytes()
  (tmp_path / "bigcut.nii.gz").write_bytes(packed[:len(packed) // 2])
  with pytest.raises(ReaderError, match=r"bigcut\.nii\.gz: cannot read voxel data: "
                                        "Compressed file ended"):
    read("nifti", tmp_path / "bigcut.nii.gz")


# --- MedMNIST ---------------------------------------------------------------------

def test_medmnist_rows_equal_the_stored_arrays(tmp_path):
  grey = medmnist.make_synthetic_npz(tmp_path / "breastmnist.npz", "breastmnist", 28,
                                     counts=(300, 5, 7))
  out = read("medmnist", grey)
  with np.load(grey) as z:
    want = [(s, i, z[f"{s}_images"][i]) for s in ("train", "val", "test")
            for i in range(len(z[f"{s}_images"]))]
  assert len(out) == len(want) == 312
  for (p, m), (split, i, ref) in zip(out, want):
    assert m["index"] == [split, i]
    np.testing.assert_array_equal(p, ref)
  assert out[0][1]["transform"] == "MedMNIST npz, as stored"
  assert out[0][1]["modality"] == "ultrasound" and out[0][1]["anatomy"] == "breast"
  assert out[0][1]["orig_size"] == [28, 28] and p.flags.writeable
  colour = medmnist.make_synthetic_npz(tmp_path / "bloodmnist_64.npz", "bloodmnist", 64,
                                       counts=(3, 2, 4))
  out = read("auto", colour, splits=["test", "val"])
  with np.load(colour) as z:
    want = list(z["test_images"]) + list(z["val_images"])
  assert [m["index"] for _, m in out] == [["test", i] for i in range(4)] + [["val", 0], ["val", 1]]
  for (p, _), ref in zip(out, want):
    assert p.shape == (64, 64, 3)
    np.testing.assert_array_equal(p, ref)


def test_medmnist_flag_from_option_and_rejects(tmp_path):
  path = medmnist.make_synthetic_npz(tmp_path / "my_export.npz", "octmnist", 28, (2, 1, 1))
  with pytest.raises(ReaderError, match=r"my_export\.npz: cannot tell the MedMNIST benchmark "
                                        "from the file name.*'flag'"):
    read("medmnist", path)
  out = read("medmnist", path, flag="octmnist", splits=["train"])
  assert len(out) == 2 and out[0][1]["modality"] == "OCT"
  # The size in the name must be the size stored.
  os.rename(path, tmp_path / "octmnist_64.npz")
  with pytest.raises(ReaderError, match=r"octmnist_64\.npz: not a octmnist MedMNIST npz: .*"
                                        "holds 28 px images, expected 64"):
    read("medmnist", tmp_path / "octmnist_64.npz")
  # Colour images in a grey benchmark's file.
  with pytest.raises(ReaderError, match=r"octmnist_64\.npz: not a dermamnist MedMNIST npz"):
    read("medmnist", tmp_path / "octmnist_64.npz", flag="dermamnist")
  (tmp_path / "pathmnist.npz").write_text("not a zip " * 10)
  with pytest.raises(ReaderError, match=r"pathmnist\.npz: not a pathmnist MedMNIST npz: "
                                        "not a readable npz file"):
    read("medmnist", tmp_path / "pathmnist.npz")


def test_medmnist_stream_cut_short_is_a_reject(tmp_path):
  rng = np.random.default_rng(5)
  arrays = {f"{s}_images": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            for s, n in (("train", 40), ("val", 2), ("test", 2))}
  arrays.update({f"{s}_labels": np.zeros((len(arrays[f"{s}_images"]), 1), np.uint8)
                 for s in ("train", "val", "test")})
  path = tmp_path / "pneumoniamnist.npz"
  np.savez(path, **arrays)  # stored, not deflated: a flipped byte breaks only the CRC
  data = bytearray(path.read_bytes())
  at = data.index(arrays["train_images"][20].tobytes())
  data[at] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(ReaderError, match=r"pneumoniamnist\.npz: damaged MedMNIST npz at train "
                                        r"row \d+: BadZipFile"):
    read("medmnist", path)


# --- video ------------------------------------------------------------------------

def _clip(n=9, h=48, w=64):
  yy, xx = np.mgrid[0:h, 0:w]
  grey = [((xx * 3 + yy * 2 + i * 20) % 256).astype(np.uint8) for i in range(n)]
  rgb = [np.stack([(xx * 4 + i * 10) % 256, (yy * 5) % 256, np.full_like(xx, 25 * i)],
                  -1).astype(np.uint8) for i in range(n)]
  return grey, rgb


def test_video_lossless_frames_with_stride_and_limit(tmp_path):
  grey, rgb = _clip()
  g = write_video(tmp_path / "us.mkv", grey, "ffv1", "gray", "gray")
  out = read("video", g, stride=2)
  assert [m["index"] for _, m in out] == [0, 2, 4, 6, 8]
  for (p, m), i in zip(out, range(0, 9, 2)):
    np.testing.assert_array_equal(p, grey[i])  # grey stream -> (H, W)
    assert m["orig_size"] == [48, 64] and m["transform"] == "video ffv1 gray -> grey"
  assert [m["index"] for _, m in read("video", g, stride=2, max_frames=3)] == [0, 2, 4]
  c = write_video(tmp_path / "endo.mkv", rgb, "ffv1", "bgr0", "rgb24")
  out = read("auto", c, stride=4)
  assert [m["index"] for _, m in out] == [0, 4, 8]
  for (p, _), i in zip(out, (0, 4, 8)):
    np.testing.assert_array_equal(p, rgb[i])


def test_video_h264_frames_close_to_written(tmp_path):
  grey, rgb = _clip(n=6)
  c = write_video(tmp_path / "clip.mp4", rgb, "libx264", "yuv444p", "rgb24", qp="0")
  out = read("video", c)
  assert len(out) == 6 and out[0][1]["transform"] == "video h264 yuv444p -> RGB"
  for (p, _), ref in zip(out, rgb):
    assert_close(p, ref, tol=3)  # only RGB <-> YUV rounding
  # Grey content in a colour stream (the usual ultrasound export) comes out (H, W).
  g = write_video(tmp_path / "grey.mp4", [np.stack([f] * 3, -1) for f in grey],
                  "libx264", "yuv420p", "rgb24", crf="10")
  out = read("video", g, max_frames=4)
  assert len(out) == 4 and "equal channels -> grey" in out[0][1]["transform"]
  for (p, _), ref in zip(out, grey):
    assert_close(p, ref, tol=6)


def test_video_rejects(tmp_path, monkeypatch):
  (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
  pytest.importorskip("av")
  with pytest.raises(ReaderError, match=r"noise\.mp4: cannot open video"):
    read("video", tmp_path / "noise.mp4")
  grey, _ = _clip(n=3)
  good = write_video(tmp_path / "ok.mkv", grey, "ffv1", "gray", "gray")
  monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
  with pytest.raises(ReaderError, match=r'ok\.mkv: reading video needs the package "av" '
                                        r'\(PyAV\).*pip install "biovfm-jax\[video\]"'):
    read("auto", good)


# --- rejects common to all readers --------------------------------------------------

@pytest.mark.parametrize("reader,name", [
    ("image", "x.png"), ("dicom", "x.dcm"), ("nifti", "x.nii"), ("medmnist", "x.npz"),
    ("video", "x.mp4"), ("hdf5", "x.h5"), ("npy", "x.npy"), ("auto", "x.png"),
    ("auto", "x.unknown")])
def test_empty_file_has_its_own_reason(tmp_path, reader, name):
  (tmp_path / name).write_bytes(b"")
  with pytest.raises(ReaderError, match=rf"{name}: empty file \(0 bytes\)"):
    read(reader, tmp_path / name)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL, on the random-bytes TIFF
def test_corrupt_images_say_what_is_wrong(tmp_path, monkeypatch):
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(
      tmp_path / "whole.png")
  data = (tmp_path / "whole.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
  with pytest.raises(ReaderError, match=r"cut\.png: truncated PNG: image file is truncated"):
    read("image", tmp_path / "cut.png")
  (tmp_path / "stub.png").write_bytes(data[:40])  # the signature, not the header
  with pytest.raises(ReaderError, match=r"stub\.png: damaged PNG: cannot identify image file"):
    read("auto", tmp_path / "stub.png")
  (tmp_path / "notes.png").write_text("these are notes, not pixels\n" * 5)
  with pytest.raises(ReaderError, match=r"notes\.png: not an image: the content is text "
                                        r"\(the name ends in '\.png'\)"):
    read("image", tmp_path / "notes.png")
  (tmp_path / "scan.jpg").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
  with pytest.raises(ReaderError, match=r"scan\.jpg: not an image: the content is DICOM"):
    read("auto", tmp_path / "scan.jpg")
  noise = np.random.default_rng(1).integers(1, 256, 300, dtype=np.uint8)  # no NUL byte
  (tmp_path / "noise.tif").write_bytes(noise.tobytes())
  with pytest.raises(ReaderError, match=r"noise\.tif: not a readable image"):
    read("image", tmp_path / "noise.tif")
  with pytest.raises(ReaderError, match=r"gone\.png: no such file"):
    read("image", tmp_path / "gone.png")
  # PIL's decompression-bomb guard raises neither OSError nor ValueError.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  with pytest.raises(ReaderError, match=r"whole\.png: image too large: .*MAX_IMAGE_PIXELS"):
    read("image", tmp_path / "whole.png")


def test_auto_picks_the_reader_and_rejects_unknown_types(tmp_path):
  Image.fromarray(np.full((5, 6), 7, np.uint8)).save(tmp_path / "a.png")
  Image.fromarray(np.full((5, 6), 7, np.uint8)).save(tmp_path / "png_without_suffix", "PNG")
  write_dicom(tmp_path / "1.2.840.113619.2.55", np.ones((4, 4)))  # a UID for a name
  nib.save(nib.Nifti1Image(np.ones((2, 3, 4), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
  (tmp_path / "m.npz").write_bytes(b"PK")
  (tmp_path / "e.avi").write_bytes(b"RIFF")
  (tmp_path / "labels.csv").write_text("a,b\n1,2\n")
  expected = {"a.png": "image", "png_without_suffix": "image", "1.2.840.113619.2.55": "dicom",
              "v.nii.gz": "nifti", "m.npz": "medmnist", "e.avi": "video", "labels.csv": None}
  for name, reader in expected.items():
    assert readers.detect_reader(str(tmp_path / name)) == reader, name
  (p, m), = read("auto", tmp_path / "png_without_suffix")
  np.testing.assert_array_equal(p, np.full((5, 6), 7, np.uint8))
  assert read("auto", tmp_path / "1.2.840.113619.2.55")[0][1]["modality"] == "X-ray"
  with pytest.raises(ReaderError, match=r"labels\.csv: unrecognised file type \(suffix '\.csv', "
                                        r"content text\)"):
    read("auto", tmp_path / "labels.csv")


# --- array stacks: HDF5 and .npy ----------------------------------------------------

def test_hdf5_stacks_parts_encoded_images_and_rejects(tmp_path, monkeypatch):
  import io
  import h5py
  from data_pipeline.readers import arrays
  rng = np.random.default_rng(0)
  recon = (rng.random((6, 20, 24)) * np.linspace(1, 3, 6)[:, None, None]).astype(np.float32)
  with h5py.File(tmp_path / "knee.h5", "w") as f:
    f["kspace"] = np.ones((6, 20, 24), np.complex64)
    f["reconstruction_esc"] = recon
  items = list(readers.READERS["hdf5"](str(tmp_path / "knee.h5"), {
      "datasets": ["reconstruction_rss", "reconstruction_esc"], "stride": 2}))
  assert [m["index"] for _, m in items] == [["reconstruction_esc", k] for k in (0, 2, 4)]
  # One window for the file: the brighter later slices come out brighter.
  assert items[0][0].mean() < items[2][0].mean()
  # Without `datasets`: the one real-valued stack (k-space is complex).
  assert len(list(readers.READERS["hdf5"](str(tmp_path / "knee.h5"), {}))) == 6
  with pytest.raises(ReaderError, match=r"holds none of the datasets \['x'\] \(it has: "
                     r"kspace, reconstruction_esc\)"):
    list(readers.READERS["hdf5"](str(tmp_path / "knee.h5"), {"datasets": "x"}))
  with pytest.raises(ReaderError, match="complex64 data is not an image"):
    list(readers.READERS["hdf5"](str(tmp_path / "knee.h5"), {"datasets": "kspace"}))
  (tmp_path / "fake.h5").write_bytes(b"not hdf5 at all" * 10)
  with pytest.raises(ReaderError, match="fake.h5: not a readable HDF5 file"):
    list(readers.READERS["auto"](str(tmp_path / "fake.h5")))
  # Parts: a stack of 10 with parts of 4 -> 3 inputs that together read each image once.
  with h5py.File(tmp_path / "patches_x.h5", "w") as f:
    f["x"] = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
  monkeypatch.setattr(arrays, "PART_IMAGES", 4)
  parts = readers.inputs_for(str(tmp_path / "patches_x.h5"), "hdf5")
  assert parts == [str(tmp_path / f"patches_x.h5::{a}-{b}") for a, b in ((0, 4), (4, 8), (8, 10))]
  got = [m["index"][1] for p in parts for _, m in readers.READERS["hdf5"](p, {"stride": 3})]
  assert got == [0, 3, 6, 9]  # the stride runs over the whole stack, not per part
  # Encoded images, one scalar dataset each (ISIC-2024's train-image.hdf5).
  with h5py.File(tmp_path / "train-image.hdf5", "w") as f:
    for k in range(3):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, "PNG")
      f[f"ISIC_{k:07d}"] = np.void(buf.getvalue())
  items = list(readers.READERS["hdf5"](str(tmp_path / "train-image.hdf5"), {}))
  assert [m["index"][0] for _, m in items] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
  assert items[0][0].shape == (12, 16, 3)
  with h5py.File(tmp_path / "train-image.hdf5", "a") as f:
    f["ISIC_9999999"] = np.void(b"garbage")
  with pytest.raises(ReaderError, match=r"dataset /ISIC_9999999: its bytes are not an image"):
    list(readers.READERS["hdf5"](str(tmp_path / "train-image.hdf5"), {}))


def test_npy_stacks_volumes_and_single_images(tmp_path):
  vol = np.zeros((5, 6, 7), np.int16)
  vol[:, 1:5, 2:6] = np.arange(5)[:, None, None] * 100 + 50
  np.save(tmp_path / "vol.npy", vol)
  first = list(readers.READERS["npy"](str(tmp_path / "vol.npy"), {"skip_empty": False}))
  assert len(first) == 5 and first[0][0].shape == (6, 7)
  along = list(readers.READERS["npy"](str(tmp_path / "vol.npy"), {"axis": 2,
                                                                 "skip_empty": False}))
  assert len(along) == 7 and along[0][0].shape == (5, 6)
  kept = list(readers.READERS["npy"](str(tmp_path / "vol.npy"), {"axis": 2}))
  assert [m["index"] for _, m in kept] == [2, 3, 4, 5]  # empty columns skipped
  np.save(tmp_path / "rgb.npy", np.full((9, 8, 3), 7, np.uint8))
  (one, meta), = readers.READERS["npy"](str(tmp_path / "rgb.npy"), {"skip_empty": False})
  assert one.shape == (9, 8, 3) and meta["transform"] == "none"
  np.save(tmp_path / "five.npy", np.zeros((2, 3, 4, 5, 6)))
  with pytest.raises(ReaderError, match=r"five.npy: array of shape \(2, 3, 4, 5, 6\) is not"):
    list(readers.READERS["npy"](str(tmp_path / "five.npy")))
  (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
  with pytest.raises(ReaderError, match="bad.npy: not a readable .npy array"):
    list(readers.READERS["auto"](str(tmp_path / "bad.npy")))
