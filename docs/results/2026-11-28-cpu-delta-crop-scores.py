"""Bird (static sign) score: whole frame vs re-inferred crops with 16/48/96/160 px context, each crop placed
at its own position on a gray canvas ("same") or at the canvas origin; every vtest frame. Run from the repo root:
python docs/results/2026-11-28-cpu-delta-crop-scores.py  (writes /tmp/d5/crop_scores.npy; prints the table)."""
import sys, numpy as np, time
from daemon.backend import build_engine
from daemon.cameras import resolve_builtin
from daemon.config.model import ModelConfig
from daemon.sources.replay import load_jpeg_frames
from daemon.decode.jpeg import decode_jpeg
from daemon.decode.letterbox import letterbox_into, letterbox_params
from daemon.inference.yolo import decode_output
step = int(sys.argv[1]) if len(sys.argv) > 1 else 1
frames = load_jpeg_frames(resolve_builtin("builtin:vtest"), 90)
ch = build_engine(ModelConfig(path="builtin:yolov8n"), 16)
eng, lay = ch.engine, ch.engine.model.layout
S = 640
sign = np.array([24, 172, 42, 198], float)  # model input px
ctxs = [16, 48, 96, 160]
A = 32
def score(arr):
    best = 0.0
    for x1, y1, x2, y2, s, c in arr:
        if int(c) != 14: continue
        iw = min(x2, sign[2]) - max(x1, sign[0]); ih = min(y2, sign[3]) - max(y1, sign[1])
        if iw > 0 and ih > 0 and iw * ih > 0.3 * (sign[2]-sign[0])*(sign[3]-sign[1]):
            best = max(best, float(s))
    return best
rows = []
buf = np.empty((1 + 2*len(ctxs), 3, S, S), np.float32)
for i in range(0, len(frames), step):
    img = decode_jpeg(frames[i], 1 << 26)
    letterbox_into(img, S, buf[0])
    for k, c in enumerate(ctxs):
        x1 = max(0, int(sign[0] - c)) // A * A; y1 = max(80, int(sign[1] - c)) // A * A
        x2 = -(-int(sign[2] + c) // A) * A; y2 = -(-min(560, int(sign[3] + c)) // A) * A
        for j, (ox, oy) in enumerate([(x1, y1), (0, 0)]):
            b = buf[1 + 2*k + j]; b.fill(114/255)
            b[:, oy:oy+y2-y1, ox:ox+x2-x1] = buf[0][:, y1:y2, x1:x2]
    out = eng.infer(buf)
    dets = decode_output(out, lay, 0.05, 0.7)
    rows.append([score(d) for d in dets])
    if i % 100 == 0: print(i, rows[-1], flush=True)
r = np.array(rows)
import os; os.makedirs("/tmp/d5", exist_ok=True); np.save("/tmp/d5/crop_scores.npy", r)
full = r[:, 0] > 0.25
print("full det frames", full.sum(), "of", len(r))
names = ["full"] + [f"c{c}{'same' if j == 0 else 'origin'}" for c in ctxs for j in range(2)]
for k in range(1, r.shape[1]):
    d = r[:, k] > 0.25
    corr = np.corrcoef(r[:, 0], r[:, k])[0, 1]
    print(names[k], "det", d.sum(), "agree", (d == full).mean().round(3), "tp", (d & full).sum(), "corr", round(corr, 3),
          "mean diff", round(float((r[:, k]-r[:, 0]).mean()), 3))
