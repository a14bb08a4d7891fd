"""How far a candidate model (e.g. INT8) strays from a reference (FP32): COCO-style mAP of the candidate with the
reference's detections as ground truth, per-class recall, model bytes and CPU speed."""
