"""biovfm-jax: pretraining and benchmarking biomedical vision foundation models in JAX."""
from setuptools import find_packages, setup

# Ranges are the versions this code was written and tested against: these
# libraries moved their APIs often (nnx eager sharding, grain datasets).
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8",
    "tensorflow-datasets>=4.9.10",
    "ml_collections>=1.1",
    "clu>=0.0.12",
    "tensorflow-cpu>=2.21",   # clu's metric writers import tensorflow
    "tensorboard>=2.21",
    "absl-py",
    "numpy>=2",
    "pillow>=11",
    # Readers for medical formats, and the packages that ship the mini corpus.
    "pydicom>=3",
    "nibabel>=5",
    "nilearn>=0.11",
    "scikit-image>=0.25",
    "h5py>=3.10",             # FastMRI and PatchCamelyon ship HDF5 (catalog ingestion)
    # The scaling study (the results store, biovfm_jax/analysis, the notebooks): tables in
    # pandas, fits with scipy, Davies-Bouldin with scikit-learn, figures with
    # matplotlib (also the quickstart's reconstructions and PCA maps).
    "pandas>=2.2",
    "scipy>=1.11",
    "scikit-learn>=1.4",
    "matplotlib>=3.8",
]

setup(
    name="biovfm-jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["biovfm_jax*", "data_pipeline*", "configs*"]),
    py_modules=["main"],
    install_requires=INSTALL_REQUIRES,
    # The paper's published results, the analysis' default table.
    package_data={"biovfm_jax.analysis": ["published.csv"], "data_pipeline.catalog": ["*.toml"]},
    extras_require={
        "cuda": ["jax[cuda12]>=0.10.2,<0.11"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        # Video frames for ingestion (PyAV bundles its own ffmpeg).
        "video": ["av>=14"],
        # Reading PyTorch .pth files (safetensors alone needs no torch).
        # transformers: saves the model folders --format=hf imports (from_pretrained
        # + save_pretrained); the import itself reads config.json and weights without it.
        # open_clip_torch: builds the CLIP models --format=open_clip imports (the
        # import itself reads the weights file and open_clip_config.json without it).
        "interop": ["torch>=2.9", "safetensors>=0.4", "transformers>=5.25,<6",
                    "open_clip_torch>=3.3,<4"],
        # torch/torchvision pinned to the builds this project tests against (a
        # bare `torch` may pull a multi-GB CUDA build); timm builds reference
        # models for the import/export parity tests; medmnist's own evaluator
        # checks our metrics.
        "test": ["pytest>=8", "pytest-xdist>=3", "torch==2.14.1", "torchvision==0.29.1",
                 "timm>=1.0", "safetensors>=0.4", "medmnist==3.0.2", "av>=14",
                 # transformers: the reference models of the --format=hf parity tests.
                 "transformers>=5.25,<6",
                 # open_clip_torch: the reference CLIP model of the --format=open_clip tests.
                 "open_clip_torch>=3.3,<4",
                 # monai: its DiceMetric and MeanIoU check the segmentation metrics.
                 "monai>=1.5,<2",
                 # libtpu: the ahead-of-time fit check compiles for a TPU topology on CPU.
                 "jax[tpu]>=0.10.2,<0.11",
                 # gs:// tests: a GCS emulator on 127.0.0.1, reached by epath through gcsfs.
                 "gcp-storage-emulator>=2024.8", "gcsfs>=2024.6",
                 # tests/test_notebooks.py runs the notebooks in an ipykernel of the test's
                 # Python through nbclient.
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
    },
)
