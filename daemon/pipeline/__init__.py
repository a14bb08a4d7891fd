"""Batching across cameras and the staged runner that drives decode -> inference -> post-processing."""
