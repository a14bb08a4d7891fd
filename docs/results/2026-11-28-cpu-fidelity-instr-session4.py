"""session 4: Instrumented delta replay (private copy): records published boxes (fresh/cached), regions, and every crop box
at conf >= 0.05 with its edge-rule verdict. Pipeline behaviour unchanged (decode at 0.05, filtered > conf after)."""
import json, pickle, sys, time
from pathlib import Path
import numpy as np
from daemon.backend import build_engine
from daemon.cameras import resolve_builtin
from daemon.config.model import DeltaConfig, ModelConfig
from daemon.delta.evaluate import replay_once, load_record
from daemon.delta.tracker import content_rect
from daemon.fidelity.metrics import evaluate
from daemon.sources.replay import load_jpeg_frames
import daemon.pipeline.runner as R

out = Path(sys.argv[1]); batch = int(sys.argv[2]); setting = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
LOW = 0.05
RAW = {}
orig_rows = R.PipelineRunner._decode_rows
def _decode_rows(self, batch_, raw):
    dec = self._opts.batch_decoder
    def low(raw_, layout, conf, iou, md):
        return dec(raw_, layout, np.minimum(conf, LOW), iou, md)
    class O: pass
    saved = self._opts
    try:
        object.__setattr__(self, "_opts", _Proxy(saved, low))
        return orig_rows(self, batch_, raw)
    finally:
        object.__setattr__(self, "_opts", saved)
class _Proxy:
    def __init__(self, o, dec): self._o, self.batch_decoder = o, dec
    def __getattr__(self, k): return getattr(self._o, k)
R.PipelineRunner._decode_rows = _decode_rows
orig_rb = R.PipelineRunner._region_boxes
def _region_boxes(self, raw, item, settings, *a):
    res = orig_rb(self, raw, item, settings, *a)
    c = content_rect(item.letterbox); e = R.EDGE_PX
    rec = []
    for p in item.placements:
        arr = raw[p.slot]
        r = p.region; w, h = r.x2 - r.x1, r.y2 - r.y1
        cx, cy = (arr[:, 0] + arr[:, 2]) / 2, (arr[:, 1] + arr[:, 3]) / 2
        inside = (cx >= p.x) & (cx < p.x + w) & (cy >= p.y) & (cy < p.y + h)
        ok = ((r.x1 <= c.x1) | (arr[:, 0] > p.x + e)) & ((r.y1 <= c.y1) | (arr[:, 1] > p.y + e)) & \
             ((r.x2 >= c.x2) | (arr[:, 2] < p.x + w - e)) & ((r.y2 >= c.y2) | (arr[:, 3] < p.y + h - e))
        a = arr[inside].copy(); okk = ok[inside]
        a[:, [0, 2]] += r.x1 - p.x; a[:, [1, 3]] += r.y1 - p.y
        rec.append(((r.x1, r.y1, r.x2, r.y2), np.concatenate([a, okk[:, None].astype(np.float32)], 1)))
    RAW[item.frame.seq] = rec
    return res
R.PipelineRunner._region_boxes = _region_boxes

frames = load_jpeg_frames(resolve_builtin("builtin:vtest"), 90)
choice = build_engine(ModelConfig(path="builtin:yolov8n"), batch)
names = choice.engine.model.class_names
full = load_record(Path("/tmp/s4/ref.json"))
t0 = time.time()
cand = replay_once(choice, frames, DeltaConfig(enabled=True, keyframe_s=3600, **setting), batch)
print("replay s", time.time() - t0)
seqs = sorted(full.detections)
def arr(ds): return np.array([[d.x1, d.y1, d.x2, d.y2, d.score, d.class_id] for d in ds], np.float64).reshape(-1, 6)
m = evaluate([arr(full.detections[s]) for s in seqs], [arr(cand.detections.get(s, ())) for s in seqs], names)
px = 1 - float(np.mean(list(cand.inferred.values()))); rows = 1 - cand.engine_rows / full.engine_rows
dec = {}
for d in cand.decisions.values(): dec[d] = dec.get(d, 0) + 1
print(f"px saved {px:.1%} rows saved {rows:.1%} rows {cand.engine_rows} {dec} batch_sizes {cand.batch_sizes}")
print(f"ow mAP50 {m.map50_weighted:.4f} 50-95 {m.map50_95_weighted:.4f} recall {m.recall50_weighted:.4f} mean {m.map50_mean:.4f}")
for c in m.classes:
    print(f"  {c.name:12s} {c.ref_objects:5d} ap50 {c.ap50:.4f} ap50-95 {c.ap50_95:.4f} rec {c.recall50:.4f} cand {c.candidate_boxes}")
pickle.dump({"cand": cand, "raw": RAW, "metrics": m.to_dict(), "px": px, "rows": rows, "setting": setting,
             "batch": batch}, open(out, "wb"))
choice.engine.close()
