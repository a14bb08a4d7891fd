"""CPU image decoding (JPEG) and the Ultralytics-compatible letterbox."""
