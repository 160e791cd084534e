"""Neurons from membrane maps, and the challenge's scores: no TensorFlow. Imports :mod:`em_unet.io`
and the bottom modules (errors, settings, cluster).

- :mod:`.watershed`: boundary map -> neurons (seeded watershed, region-adjacency merging);
- :mod:`.labels`: labels made unique across slices and blocks (the one place);
- :mod:`.metrics`: ISBI 2012 V_rand / V_info exactly as Fiji's challenge script computes them;
- :mod:`.blockwise`: segmenting chunked volumes slice by slice on a Dask cluster.
"""
