"""Model loading, inference engines, and YOLO output decoding (box decoding and NMS live outside engines)."""
