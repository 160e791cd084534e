"""Reading and writing stacks and volumes: the bottom layer. Imports nothing of em-unet but
:mod:`em_unet.errors`, and never TensorFlow.

- :mod:`.stacks`: TIFF/PNG stacks and the intensity and label conventions;
- :mod:`.volumes`: HDF5, Zarr and OME-Zarr addresses, opened lazily;
- :mod:`.files`: writing a file or folder without losing earlier results or leaving debris;
- :mod:`.writers`: the one writer interface every output goes through (TIFF, Zarr/OME-Zarr, HDF5),
  with the resume markers of unfinished chunked outputs.
"""
