"""Adaptive delta caching: per-camera reference signatures, change maps, and the skip/regions/full policy."""
