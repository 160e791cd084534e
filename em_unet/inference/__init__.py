"""Models applied to data: overlap-tile prediction, blockwise prediction of chunked volumes, export for
TF Serving. TensorFlow is imported lazily, only where a model is loaded or exported. Imports
:mod:`em_unet.io`, :mod:`em_unet.config` and the bottom modules; never :mod:`em_unet.training`, except
to load a ``.keras`` file's custom layer.

- :mod:`.tiling`: the one frozen :class:`~.tiling.Tiling` value (tile, margin, overlap, tile batch) and
  the tile grid of a slice;
- :mod:`.predict`: overlap-tile prediction of arrays and TIFF stacks;
- :mod:`.blockwise`: the same on chunked volumes, block by block on Dask;
- :mod:`.export`: SavedModels in TF Serving's layout.
"""
