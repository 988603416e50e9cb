"""Linear segmentation probe: the frozen encoder's patch tokens -> BatchNorm ->
1x1 linear, logits upsampled to the mask size (DINOv2's `linear` head; its
`+ms` features with --config.head.layers=last4). See
biovfm_jax/evaluate/segmentation.py.

  python evaluate.py --config=configs/eval/segmentation_linear.py \
      --checkpoint=/tmp/quickstart_dinov2 --out_dir=/tmp/eval/seg_dinov2
  python evaluate.py --config=configs/eval/segmentation_linear.py \
      --checkpoint=RUN --out_dir=DIR --benchmarks=mni_tissue,msd:/data/Task04_Hippocampus \
      --config.head.layers=last4 --config.save_predictions=png
  python -m biovfm_jax.evaluate.report --merge DIR1 DIR2 --out=DIR --metric=dice

Benchmarks (comma list): mni_tissue (built in, offline), msd:<folder> (a
Medical Segmentation Decathlon task), folder:<folder> (images/ and masks/).
"""
import ml_collections

from configs.eval import common


def get_config(arg=None):
  del arg
  c = common.get_config("segmentation")
  c.benchmarks = "mni_tissue"
  c.image_size = 224                 # the mask size; images are fed at input_size
  c.features.batch_size = 64
  # The head. layers: 'last' (final-norm patch tokens) | 'last4' (the last 4
  # blocks, each through the final norm, concatenated). DINOv3's linear
  # segmentation recipe (AdamW, weight decay 1e-3, warmup then cosine, channel
  # dropout 0.1) but lr 1e-2, the classification probe's: DINOv3's 1e-3 is for
  # 40k iterations, these benchmarks give a few hundred. augment: random
  # horizontal flips, training features
  # recomputed every epoch (else computed once and cached). bootstrap: number of
  # resamples of the test images for 95% intervals (0: none).
  c.head = ml_collections.ConfigDict({
      "layers": "last", "epochs": 50, "batch_size": 16, "lr": 1e-2, "weight_decay": 1e-3,
      "warmup_epochs": 1.0, "dropout": 0.1, "augment": False, "seed": 0, "bootstrap": 0})
  # How benchmarks are prepared (data_pipeline/seg_benchmarks.py): MSD slicing
  # axis (0 sagittal, 1 coronal, 2 axial), every stride-th slice, keep
  # 'foreground' slices only or 'all', split seed, MSD image channel; folder
  # benchmarks: class names (background first) and their mask values.
  c.segmentation = ml_collections.ConfigDict({
      "axis": 2, "stride": 1, "keep": "foreground", "seed": 0, "channel": 0,
      "classes": "", "label_values": ""})
  c.save_predictions = ""            # '' | 'png' (predictions/<id>.png) | 'npz'
  c.overlays = 8                     # test images in overlays.png (0: none)
  return c
