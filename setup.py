from setuptools import find_packages, setup

setup(
    name="em-unet",
    version="0.1.0",
    description="Train, tune and serve U-Nets that segment neuronal membranes in EM stacks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["em_unet", "em_unet.*"]),
    install_requires=[
        "keras-tuner>=1.4",
        "tensorboard",
        "tifffile",
        # Its PyPI wheel was built against NumPy 1: install with --no-binary elasticdeform (see README).
        "elasticdeform",
        "matplotlib",
        "scikit-image",
        "numpy>=2",
        "tqdm",
        "tomli; python_version < '3.11'",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.16"],
        "gpu": ["tensorflow[and-cuda]>=2.16"],
        "dev": ["pytest"],
    },
    entry_points={"console_scripts": ["em-unet = em_unet.cli:main"]},
)
