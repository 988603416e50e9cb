"""Readers: DICOM, NIfTI and image folders, checked against the libraries' raw arrays."""
import os
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from data_pipeline import records
from data_pipeline.readers import registry as readers
from data_pipeline.readers import dicom, images, nifti
from data_pipeline.readers.common import ReaderError

META_KEYS = {"source", "modality", "anatomy", "path", "index", "orig_size", "transform"}


def read_headers(path, reader="dicom", source="test", **spec):
  """(pixels, record header) for each image of `path`, as ingestion builds them."""
  return [(p, records.header(source, m, p, **spec)) for p, m in readers.READERS[reader](path)]


def expected_window(values, lo, hi):
  """The reference: linear [lo, hi] -> [0, 255] in float64, rounded."""
  return np.rint(np.clip((values - lo) / (hi - lo) * 255.0, 0, 255)).astype(np.uint8)


def write_dicom(path, frames, photometric="MONOCHROME2", bits=12, **tags):
  """A minimal valid DICOM file holding `frames` (uint16, (H, W) or (F, H, W))."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.SOPClassUID = SecondaryCaptureImageStorage
  ds.SOPInstanceUID = generate_uid()
  ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
  ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  ds.Modality = tags.pop("Modality", "CR")
  if frames is not None:
    ds.set_pixel_data(np.asarray(frames, np.uint16), photometric, bits)
  else:
    ds.PhotometricInterpretation = photometric
  for k, v in tags.items():
    setattr(ds, k, v)
  ds.save_as(path, enforce_file_format=True)
  return str(path)


# --- DICOM ---------------------------------------------------------------------

def test_dicom_rescale_then_percentile_window_on_ct_small():
  path = get_testdata_file("CT_small.dcm")
  ds = pydicom.dcmread(path)
  assert "WindowCenter" not in ds  # so the percentile window is what applies
  hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
  lo, hi = np.percentile(hu, [0.5, 99.5])
  (pixels, meta), = read_headers(path)
  assert pixels.dtype == np.uint8 and pixels.shape == (128, 128)
  diff = np.abs(pixels.astype(int) - expected_window(hu, lo, hi))
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01
  assert set(meta) == META_KEYS
  assert meta["modality"] == "CT" and meta["orig_size"] == [128, 128] and meta["index"] == 0
  assert "intercept=-1024" in meta["transform"] and "percentile" in meta["transform"]


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_dicom_voi_window_matches_pydicom(tmp_path, function):
  from pydicom.pixels import apply_rescale, apply_windowing
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  ds.WindowCenter, ds.WindowWidth = [40, 1000], [400, 2000]  # the first one applies
  ds.VOILUTFunction = function
  path = str(tmp_path / "ct_window.dcm")
  ds.save_as(path)
  ds = pydicom.dcmread(path)
  ref = apply_windowing(apply_rescale(ds.pixel_array, ds), ds)
  # pydicom's output spans the rescaled stored range; map that to 0..255.
  y_min = -(2 ** (ds.BitsStored - 1)) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
  y_max = (2 ** (ds.BitsStored - 1) - 1) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
  ref = np.rint((ref - y_min) / (y_max - y_min) * 255)
  (pixels, meta), = read_headers(path)
  assert np.abs(pixels.astype(int) - ref).max() <= 1
  assert f"center=40 width=400 ({function})" in meta["transform"]
  assert 0 < (pixels == 255).mean() < 1 and (pixels == 0).mean() > 0  # a real window


def test_dicom_monochrome1_is_inverted(tmp_path):
  rng = np.random.default_rng(0)
  frame = rng.integers(0, 4096, (20, 30))
  tags = dict(RescaleSlope=2, RescaleIntercept=-100, WindowCenter=3000, WindowWidth=5000)
  m2 = write_dicom(tmp_path / "m2.dcm", frame, "MONOCHROME2", **tags)
  m1 = write_dicom(tmp_path / "m1.dcm", frame, "MONOCHROME1", **tags)
  (p2, _), = read_headers(m2)
  (p1, meta1), = read_headers(m1)
  ref = np.clip(((frame * 2.0 - 100) - 2999.5) / 4999 + 0.5, 0, 1) * 255
  assert np.abs(p2.astype(int) - np.rint(ref)).max() <= 1
  np.testing.assert_array_equal(p1, 255 - p2)
  assert "MONOCHROME1 inverted" in meta1["transform"]
  assert meta1["modality"] == "X-ray"  # CR maps to the corpus name


def test_dicom_multiframe_yields_each_frame_with_one_window(tmp_path):
  frames = np.stack([np.full((16, 24), v) for v in (100, 200, 300)])
  frames[:, :4, :4] = 50
  path = write_dicom(tmp_path / "mf.dcm", frames, Modality="MR")
  out = read_headers(path, source="synthetic")
  assert [m["index"] for _, m in out] == [0, 1, 2]
  assert all(p.shape == (16, 24) and m["source"] == "synthetic" and m["modality"] == "MR"
             for p, m in out)
  # One percentile window over all frames: frames stay comparable.
  lo, hi = np.percentile(frames.astype(np.float64), [0.5, 99.5])
  for (p, _), f in zip(out, frames):
    assert np.abs(p.astype(int) - expected_window(f.astype(np.float64), lo, hi)).max() <= 1
  assert out[0][0][8, 8] < out[1][0][8, 8] < out[2][0][8, 8]


def test_dicom_per_frame_rescale_from_functional_groups(tmp_path):
  frames = np.stack([np.full((8, 8), 100), np.full((8, 8), 100)])
  frames[:, 0, 0] = 0
  groups = []
  for slope in (1.0, 2.0):
    item, pvt = Dataset(), Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = slope, 0, "US"
    item.PixelValueTransformationSequence = [pvt]
    groups.append(item)
  path = write_dicom(tmp_path / "enh.dcm", frames, PerFrameFunctionalGroupsSequence=groups,
                     WindowCenter=150.5, WindowWidth=201)
  out = read_headers(path)
  # Window [50, 250]: 100 -> 63.75, 200 -> 191.25 of 255.
  assert out[0][0][4, 4] == 64 and out[1][0][4, 4] == 191
  assert "slope=2" in out[1][1]["transform"]


def test_dicom_missing_pixel_data_names_the_file(tmp_path):
  path = write_dicom(tmp_path / "nopix.dcm", None, Rows=4, Columns=4)
  with pytest.raises(ReaderError, match="nopix.dcm.*no pixel data"):
    read_headers(path)


def test_dicom_missing_decoder_names_file_and_syntax():
  from pydicom.pixels import get_decoder
  path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
  if get_decoder(pydicom.dcmread(path).file_meta.TransferSyntaxUID).is_available:
    pytest.skip("a JPEG-LS decoder is installed here")
  with pytest.raises(ReaderError,
                     match=r"MR_small_jpeg_ls_lossless\.dcm.*JPEG-LS.*install one of"):
    read_headers(path)


def test_dicom_files_of_a_folder_skip_non_dicom_and_read_colour(tmp_path):
  write_dicom(tmp_path / "a.dcm", np.arange(64).reshape(8, 8) * 10)
  (tmp_path / "README").write_text("not an image")
  ds = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm"))
  ds.save_as(str(tmp_path / "us.dcm"))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    found = readers.files_for(str(tmp_path), "dicom")
    out = [item for path in found for item in read_headers(path, source=tmp_path.name)]
  paths = [os.path.basename(m["path"]) for _, m in out]
  assert paths.count("a.dcm") == 1 and paths.count("us.dcm") == 30
  colour = [p for p, m in out if m["modality"] == "ultrasound"]
  assert all(p.shape == (240, 320, 3) and p.dtype == np.uint8 for p in colour)
  assert all(m["source"] == tmp_path.name for _, m in out)


# --- NIfTI ---------------------------------------------------------------------

def _phantom():
  """A (20, 24, 16) float volume: an ellipsoid with structure, empty axial ends."""
  x, y, z = np.meshgrid(np.arange(20), np.arange(24), np.arange(16), indexing="ij")
  vol = (1000 + 40 * x + 7 * y + 3 * z).astype(np.float32)
  vol[((x - 10) / 8) ** 2 + ((y - 12) / 10) ** 2 + ((z - 8) / 7) ** 2 > 1] = 0
  vol[..., :2] = 0
  vol[..., -2:] = 0
  return vol


def test_nifti_canonical_slices_percentiles_and_empty_skip(tmp_path):
  vol = _phantom()
  # Stored left-to-right flipped (LAS); canonical (RAS) flips axis 0 back.
  affine = np.diag([-1.0, 1.0, 1.0, 1.0])
  path = str(tmp_path / "las.nii.gz")
  nib.save(nib.Nifti1Image(vol, affine), path)
  out = [(p, records.header("test", m, p, modality="MR", anatomy="phantom"))
         for p, m in nifti.iter_nifti(path, axes=(2,))]
  ras = vol[::-1]
  lo, hi = np.percentile(vol, [0.5, 99.5])
  kept = [m["index"][2] for _, m in out]
  assert kept == list(range(2, 14))  # the blank first and last two are skipped
  for pixels, meta in out:
    k = meta["index"][2]
    assert meta["index"][:2] == [0, 2] and set(meta) == META_KEYS
    ref = expected_window(np.rot90(ras[:, :, k]).astype(np.float64), lo, hi)
    assert pixels.shape == (24, 20)
    assert np.abs(pixels.astype(int) - ref).max() <= 1
  # Orientation: the phantom brightens with the stored i, which is RAS -x, so
  # canonical columns (RAS +x) darken; it brightens with y, which points up.
  mid = out[6][0]
  assert mid[12, 3] > mid[12, 16]
  assert mid[3, 10] > mid[20, 10]


def test_nifti_axes_stride_aspect_and_4d(tmp_path):
  vol = _phantom()
  vol4 = np.stack([vol, vol * 2 + 5], axis=-1)
  path = str(tmp_path / "aniso4d.nii")
  nib.save(nib.Nifti1Image(vol4, np.diag([1.0, 1.0, 2.0, 1.0])), path)
  first = list(nifti.iter_nifti(path, axes=(0, 2), stride=3, skip_empty=False))
  assert {m["index"][0] for _, m in first} == {0}
  assert [m["index"][2] for _, m in first if m["index"][1] == 0] == list(range(0, 20, 3))
  sag = [p for p, m in first if m["index"][1] == 0]
  axial = [p for p, m in first if m["index"][1] == 2]
  # Sagittal slices are (z, y) with z voxels twice as long: stretched to square.
  assert sag[0].shape == (32, 24) and axial[0].shape == (24, 20)
  assert all(m["orig_size"] == [16, 24] for _, m in first if m["index"][1] == 0)
  both = list(nifti.iter_nifti(path, axes=(1,), volumes="all"))
  assert {m["index"][0] for _, m in both} == {0, 1}
  with pytest.raises(ValueError):
    list(nifti.iter_nifti(path, volumes="some"))


def test_nifti_shipped_anatomical_matches_nibabel_array():
  from nibabel.testing import data_path
  path = os.path.join(str(data_path), "anatomical.nii")
  canon = nib.as_closest_canonical(nib.load(path))
  data = np.asarray(canon.dataobj, dtype=np.float64)
  lo, hi = np.percentile(data, [0.5, 99.5])
  out = list(nifti.iter_nifti(path, axes=(1,), skip_empty=False))
  assert len(out) == data.shape[1]
  for pixels, meta in out[::8]:
    ref = expected_window(np.rot90(data[:, meta["index"][2], :]), lo, hi)
    assert np.abs(pixels.astype(int) - ref).max() <= 1
  assert all(p.dtype == np.uint8 for p, _ in out)


def test_nifti_unreadable_file_raises_reader_error(tmp_path):
  bad = tmp_path / "bad.nii"
  bad.write_bytes(b"\x00" * 100)
  with pytest.raises(ReaderError, match="bad.nii"):
    list(nifti.read(str(bad)))


# --- images and helpers ----------------------------------------------------------

def test_16bit_tiff_percentile_and_minmax_scaling(tmp_path):
  ramp = (1000 + np.arange(40 * 50).reshape(40, 50) * 2).astype(np.uint16)
  path = str(tmp_path / "ramp16.tif")
  Image.fromarray(ramp).save(path)
  (pixels, text), = images.load_image(path)
  lo, hi = np.percentile(ramp, [0.5, 99.5])
  assert np.abs(pixels.astype(int) - expected_window(ramp.astype(np.float64), lo, hi)).max() <= 1
  assert "percentile" in text
  (mm, _), = images.load_image(path, 0, 100)
  assert mm.min() == 0 and mm.max() == 255 and mm[0, 0] == 0 and mm[-1, -1] == 255


def test_16bit_colour_tiff_keeps_low_bits(tmp_path):
  import tifffile
  rgb = np.zeros((10, 12, 3), np.uint16)
  rgb[..., 0] = np.arange(12) * 300  # 0..3300: all in the low byte range for PIL
  path = str(tmp_path / "rgb16.tif")
  tifffile.imwrite(path, rgb)
  (pixels, _), = images.load_image(path, 0, 100)
  assert pixels.shape == (10, 12, 3)
  np.testing.assert_array_equal(pixels[0, :, 0], np.rint(np.arange(12) / 11 * 255))


def test_image_folder_reads_modes_pages_and_meta(tmp_path):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
  rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  Image.fromarray(gray).save(tmp_path / "a.png")
  Image.fromarray(rgb).save(tmp_path / "b.bmp")
  Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "c.png")  # grey stored as RGB
  Image.fromarray(rgb).convert("RGBA").save(tmp_path / "d.png")
  (tmp_path / "sub").mkdir()
  pages = [Image.fromarray(gray), Image.fromarray(255 - gray)]
  pages[0].save(tmp_path / "sub" / "e.tif", save_all=True, append_images=pages[1:])
  (tmp_path / "notes.txt").write_text("ignored")
  out = [item for path in readers.files_for(str(tmp_path), "image")
         for item in read_headers(path, "image", tmp_path.name, modality="microscopy")]
  names = [(os.path.relpath(m["path"], tmp_path), m["index"]) for _, m in out]
  assert names == [("a.png", 0), ("b.bmp", 0), ("c.png", 0), ("d.png", 0),
                   (os.path.join("sub", "e.tif"), 0), (os.path.join("sub", "e.tif"), 1)]
  np.testing.assert_array_equal(out[0][0], gray)
  np.testing.assert_array_equal(out[1][0], rgb)
  np.testing.assert_array_equal(out[2][0], gray)  # equal channels collapse to (H, W)
  np.testing.assert_array_equal(out[3][0], rgb)   # alpha dropped
  np.testing.assert_array_equal(out[5][0], 255 - gray)
  assert all(set(m) == META_KEYS and m["modality"] == "microscopy"
             and m["source"] == tmp_path.name for _, m in out)


def test_unreadable_image_raises_naming_the_file(tmp_path):
  (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(ReaderError, match="broken.png: not a readable image"):
    list(images.read(str(tmp_path / "broken.png")))


def test_tile_covers_image_with_edge_crops_shifted_in():
  img = np.arange(70 * 100).reshape(70, 100)
  tiles = images.tile(img, 32, 24)
  positions = [p for p, _ in tiles]
  assert sorted({y for y, _ in positions}) == [0, 24, 38]
  assert sorted({x for _, x in positions}) == [0, 24, 48, 68]
  assert len(tiles) == 12
  for (y, x), crop in tiles:
    assert crop.shape == (32, 32)
    np.testing.assert_array_equal(crop, img[y:y + 32, x:x + 32])
  (pos, small), = images.tile(img[:20, :30], 32, 16)
  assert pos == (0, 0) and small.shape == (20, 30)
  assert len(images.tile(np.zeros((64, 64, 3)), 32)) == 4  # default stride: no overlap
  with pytest.raises(ValueError):
    images.tile(img, 0)


def test_to_uint8_edge_cases():
  assert not images.to_uint8(np.full((4, 4), 7.0)).any()  # constant -> zeros
  a = np.array([[0.0, np.nan], [50.0, 100.0]])
  out = images.to_uint8(a, 0, 100)
  assert out.tolist() == [[0, 0], [128, 255]]
  with pytest.raises(ValueError):
    images.to_uint8(a, 50, 10)
  assert images.is_near_constant(np.zeros((30, 30), np.uint8))
  speck = np.zeros((30, 30), np.uint8)
  speck[0, :5] = 255
  assert images.is_near_constant(speck)
  speck[:10] = 255
  assert not images.is_near_constant(speck)
