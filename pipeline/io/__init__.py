"""Volume I/O with exact geometry, data set manifests and validation."""

from pipeline.io.formats import VolumeReadError, read_volume, write_volume
from pipeline.io.volume import Volume, make_affine

__all__ = ["Volume", "VolumeReadError", "make_affine", "read_volume", "write_volume"]
