"""The GPU data path: JPEG bytes in, detections out. Every GPU import is lazy and guarded."""
