"""Segmentation benchmarks: the built-in mni_tissue, an MSD task folder and
paired image/mask folders, made here in their real formats; bad inputs fail
naming the file."""
import json
import os

import nibabel
import numpy as np
import pytest
from PIL import Image

from data_pipeline import seg_benchmarks as sb
from data_pipeline.errors import ConfigError


def _msd(root, n_cases=4, shape=(20, 18, 6), labels=("background", "left", "right")):
  os.makedirs(root / "imagesTr")
  os.makedirs(root / "labelsTr")
  rng = np.random.default_rng(0)
  training = []
  for i in range(n_cases):
    image = rng.normal(100, 20, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[3:8, 4:9, 1:5] = 1
    mask[12:17, 4:9, 2:4] = 2
    image[mask == 1] += 80
    image[mask == 2] -= 60
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    name = f"case_{i:03d}.nii.gz"
    nibabel.save(nibabel.Nifti1Image(image, affine), root / "imagesTr" / name)
    nibabel.save(nibabel.Nifti1Image(mask, affine), root / "labelsTr" / name)
    training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
  meta = {"name": "toy", "labels": {str(i): n for i, n in enumerate(labels)},
          "modality": {"0": "MRI"}, "training": training, "test": []}
  (root / "dataset.json").write_text(json.dumps(meta))
  return root


def test_mni_tissue_is_real_anatomy(tmp_path):
  splits = {s: sb.load_split("mni_tissue", s, size=32, data_dir=str(tmp_path))
            for s in sb.SPLITS}
  total = sum(len(s) for s in splits.values())
  assert 200 < total < 320, total             # three planes of a 2 mm brain
  train = splits["train"]
  assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
  assert train.classes == sb.MNI_CLASSES
  counts = np.bincount(train.masks.ravel(), minlength=3) / train.masks.size
  assert counts[1] > 0.05 and counts[2] > 0.05  # grey and white matter both present
  # White matter is brighter than grey on T1: the labels match the image.
  grey = train.images[..., 0][train.masks == 1].mean()
  white = train.images[..., 0][train.masks == 2].mean()
  assert white > grey + 20
  # No slice in two splits; each split spans all three planes.
  ids = [set(s.ids) for s in splits.values()]
  assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
  assert {i.split("/")[1][0] for i in splits["test"].ids} == {"s", "c", "a"}
  # Prepared once: a second load reads the cache.
  again = sb.load_split("mni_tissue", "test", size=32, data_dir=str(tmp_path))
  np.testing.assert_array_equal(again.masks, splits["test"].masks)


def test_msd_layout_split_by_case(tmp_path):
  root = _msd(tmp_path / "Task99_Toy")
  name = sb.benchmark_names(f"msd:{root}")[0]
  splits = {s: sb.load_split(name, s, size=24, data_dir=str(tmp_path / "data"),
                             options={"axis": 2}) for s in sb.SPLITS}
  cases = {s: {i.split("/")[0] for i in v.ids} for s, v in splits.items()}
  assert sum(len(c) for c in cases.values()) == 4
  assert not (cases["train"] & cases["test"])
  assert splits["train"].classes == ("background", "left", "right")
  for split in splits.values():
    assert split.masks.any(axis=(1, 2)).all()   # keep='foreground'
    assert set(np.unique(split.masks)) <= {0, 1, 2}
  # Label 1 (bright) and 2 (dark) keep their intensities through the window.
  tr = splits["train"]
  assert tr.images[..., 0][tr.masks == 1].mean() > tr.images[..., 0][tr.masks == 2].mean()
  assert sb.display_name(name) == "Task99_Toy"


def test_msd_errors_name_the_file(tmp_path):
  root = _msd(tmp_path / "Task98")
  os.remove(root / "labelsTr" / "case_002.nii.gz")
  with pytest.raises(FileNotFoundError, match="case_002.nii.gz: mask listed in"):
    sb.load_split(f"msd:{root}", "train", size=16, data_dir=str(tmp_path / "d"))
  root = _msd(tmp_path / "Task97", labels=("background", "left"))  # value 2 is unknown
  with pytest.raises(ValueError, match=r"labelsTr/case_000.nii.gz: label values \[2\]"):
    sb.load_split(f"msd:{root}", "train", size=16, data_dir=str(tmp_path / "d"))


def _folder(root, n=6, size=(20, 24), mask_values=(0, 255)):
  rng = np.random.default_rng(1)
  for sub in ("images", "masks"):
    os.makedirs(root / sub)
  for i in range(n):
    image = rng.integers(0, 120, size + (3,), dtype=np.uint8)
    mask = np.full(size, mask_values[0], np.uint8)
    mask[5:12, 6:15] = mask_values[1]
    image[mask == mask_values[1]] += 100
    Image.fromarray(image).save(root / "images" / f"img{i}.png")
    Image.fromarray(mask).save(root / "masks" / f"img{i}.tif")
  return root


def test_paired_folders(tmp_path):
  root = _folder(tmp_path / "polyps")
  opts = {"classes": "background,polyp", "label_values": "0,255"}
  train = sb.load_split(f"folder:{root}", "train", size=16, data_dir=str(tmp_path / "d"),
                        options=opts)
  assert train.classes == ("background", "polyp")
  assert set(np.unique(train.masks)) == {0, 1}
  with pytest.raises(ValueError, match=r"masks/img0.tif: mask values \[255\] are not among"):
    sb.load_split(f"folder:{root}", "train", size=16, data_dir=str(tmp_path / "d"),
                  options={"classes": "background,polyp"})
  Image.fromarray(np.zeros((9, 9), np.uint8)).save(root / "masks" / "img1.tif")
  with pytest.raises(ValueError, match=r"masks/img1.tif: mask size \(9, 9\) differs"):
    sb.load_split(f"folder:{root}", "train", size=16, data_dir=str(tmp_path / "d"),
                  options=opts)
  os.remove(root / "masks" / "img1.tif")
  with pytest.raises(FileNotFoundError, match=r"images/img1.png: no mask named img1"):
    sb.load_split(f"folder:{root}", "train", size=16, data_dir=str(tmp_path / "d"),
                  options=opts)


def test_bad_specs_and_options(tmp_path):
  with pytest.raises(ConfigError, match="'brats' is not a segmentation benchmark"):
    sb.benchmark_names("mni_tissue,brats")
  with pytest.raises(ConfigError, match=r"config.segmentation: unknown keys \['axes'\]"):
    sb.load_split("mni_tissue", "train", size=16, data_dir=str(tmp_path), options={"axes": 1})
