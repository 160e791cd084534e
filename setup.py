from setuptools import find_packages, setup

# `em-unet package`: bioimage.io model packages (format 0.5), ONNX weights converted by tf2onnx and checked with
# onnxruntime. Checked on bioimageio.core 0.11.0 (bioimageio.spec 0.5.12), tf2onnx 1.17.0, onnx 1.23,
# onnxruntime 1.32 with tensorflow-cpu 2.21, numpy 2.4 and protobuf 7: none of them pins an older one.
BIOIMAGEIO = ["bioimageio.core>=0.11,<0.12", "bioimageio.spec>=0.5.12,<0.6", "tf2onnx>=1.17", "onnx", "onnxruntime"]

setup(
    name="em-unet",
    version="0.1.0",
    description="Train, tune and serve U-Nets that segment neuronal membranes in EM stacks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The search spaces and the study definition live in the top-level tuning/ and ship inside the package as
    # em_unet.tuning (em_unet/tuning is a symbolic link to ../tuning).
    packages=find_packages(include=["em_unet", "em_unet.*"]),
    package_data={"em_unet.tuning": ["*.toml"]},
    install_requires=[
        # em_unet/training/keras_patches.py and the oracle extension in em_unet/training/distribute.py
        # were checked on these.
        "keras>=3.13,<3.16",
        "keras-tuner>=1.4,<1.5",
        "tensorboard",
        "tifffile",
        # LZW, Deflate, ... compressed TIFFs (Pillow and Fiji write LZW).
        "imagecodecs",
        # Its PyPI wheel was built against NumPy 1: install with --no-binary elasticdeform (see README).
        "elasticdeform",
        "matplotlib",
        "scikit-image",
        "numpy>=2",
        "tqdm",
        # rdf.yaml of bioimage.io packages given to `em-unet predict`.
        "pyyaml",
        "tomli; python_version < '3.11'",
        # Chunked volumes (HDF5, Zarr v2/v3, OME-Zarr) and blockwise prediction on Dask.
        "h5py",
        "zarr>=3,<4",
        "numcodecs",
        "ome-zarr>=0.18",
        # dask's own "distributed" extra pins the scheduler to dask's version: a dask release without its
        # distributed release must not pair with an old distributed that cannot import it.
        "dask[array,distributed]>=2024.1",
        # The mutex watershed of em-unet segment on affinity maps (a Rust wheel; agglom's API as of 0.5).
        "mwatershed>=0.5,<0.6",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.16"],
        "gpu": ["tensorflow[and-cuda]>=2.16"],
        # ruff pinned to a minor version: its format style changes between them. The bioimage.io packages are in
        # dev too: CI tests `em-unet package` with bioimage.io's own model test.
        "dev": ["pytest", "ruff>=0.17.5,<0.18", *BIOIMAGEIO],
        "bioimageio": BIOIMAGEIO,
    },
    entry_points={"console_scripts": ["em-unet = em_unet.cli:main"]},
)
