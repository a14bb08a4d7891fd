"""deltayolo single-node runtime: cameras in, YOLO detections out, moving as few bytes as possible."""

__version__ = "0.1.0"
