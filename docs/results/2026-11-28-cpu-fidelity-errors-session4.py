# session 4 error analysis: classify person/car/truck misses and false positives of one instrumented delta run
# (2026-11-28-cpu-fidelity-instr-session4.py writes the pickle) against the every-frame reference, then the
# "oracle" ow mAP50 with each cause fixed alone. Usage: PYTHONPATH=<tree> python this.py RUN.pkl
import pickle, sys, json
from collections import Counter, defaultdict
import numpy as np
from pathlib import Path
from daemon.delta.evaluate import load_record
from daemon.fidelity.metrics import evaluate

S = 1 / 0.8333333333  # model-input -> source scale (vtest 768x576 -> 640, pad_y 80)
PAD_Y = 80.0
MAJOR = {0: "person", 2: "car", 7: "truck"}
d = pickle.load(open(sys.argv[1], "rb")); cand = d["cand"]; RAW = d["raw"]
full = load_record(Path("/tmp/s4/ref.json"))
seqs = sorted(full.detections)
names = [None] * 80
def iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0]); ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0: return 0.0
    i = iw * ih; return i / ((a[2]-a[0])*(a[3]-a[1]) + (b[2]-b[0])*(b[3]-b[1]) - i)
def src(b):  # model-input box -> source
    return (b[0] * S, (b[1] - PAD_Y) * S, b[2] * S, (b[3] - PAD_Y) * S)
def inreg(b, regs, whole=False):
    cx, cy = (b[0]+b[2])/2, (b[1]+b[3])/2
    for r in regs:
        if whole:
            if r[0] <= b[0] and b[2] <= r[2] and r[1] <= b[1] and b[3] <= r[3]: return True
        elif r[0] <= cx < r[2] and r[1] <= cy < r[3]: return True
    return False
def touches(b, regs):
    return any(r[0] < b[2] and b[0] < r[2] and r[1] < b[3] and b[1] < r[3] for r in regs)
fn = Counter(); fp = Counter(); fnlist = defaultdict(list); fplist = defaultdict(list)
fix_add = defaultdict(list); fix_drop = defaultdict(set)  # cause -> (seq, refbox) / (seq, cand idx)
prev_dec = {}
for s in seqs:
    R = [x for x in full.detections[s] if x.class_id in MAJOR]
    C = [x for x in cand.detections.get(s, ()) if x.class_id in MAJOR]
    dec = cand.decisions.get(s); regs = cand.regions.get(s, ())
    order = sorted(range(len(C)), key=lambda i: -C[i].score)
    used = set(); cm = {}
    for i in order:
        c = C[i]; best, bj = 0.5, -1
        for j, r in enumerate(R):
            if j in used or r.class_id != c.class_id: continue
            v = iou((c.x1,c.y1,c.x2,c.y2), (r.x1,r.y1,r.x2,r.y2))
            if v >= best: best, bj = v, j
        if bj >= 0: used.add(bj); cm[i] = bj
    unmatched_c = [i for i in range(len(C)) if i not in cm]
    paired_c = set()
    for j, r in enumerate(R):
        if j in used: continue
        rb = (r.x1, r.y1, r.x2, r.y2); cls = MAJOR[r.class_id]
        # best unmatched same-class candidate overlap
        bi, bv = -1, 0.0
        for i in unmatched_c:
            if C[i].class_id == r.class_id and i not in paired_c:
                v = iou((C[i].x1,C[i].y1,C[i].x2,C[i].y2), rb)
                if v > bv: bi, bv = i, v
        # also any matched candidate overlapping (duplicate-merged)?
        other = [x for x in cand.detections.get(s, ()) if x.class_id != r.class_id and iou((x.x1,x.y1,x.x2,x.y2), rb) >= 0.8]
        if dec == "full":
            cause = "full-frame miss (batch/NMS noise)"
        elif other and not (bi >= 0 and bv >= 0.1):
            cause = "relabelled: candidate has another class on it (IoU>=0.8)"
        elif bi >= 0 and bv >= 0.1:
            paired_c.add(bi)
            c = C[bi]
            if c.cached:
                cause = "low-IoU: stale cached box (moved)" + (" [touched by region]" if touches(rb, regs) else " [no region]")
            else:
                cause = "low-IoU: fresh crop box differs" + (" [ref box not whole in a region]" if not inreg(rb, regs, True) else " [ref inside region]")
        else:
            if not touches(rb, regs):
                cause = "outside regions, no cached box (appeared/flicker w/o pixel change)"
            else:
                # crop boxes around
                crop = []
                for reg, a in RAW.get(s, []):
                    for row in a:
                        if int(row[5]) == r.class_id:
                            v = iou(src(row[:4]), rb)
                            if v >= 0.5: crop.append((v, float(row[4]), bool(row[6])))
                if not inreg(rb, regs):
                    cause = "centre outside regions (touching), no candidate"
                elif any(sc > 0.25 and not ok for _, sc, ok in crop):
                    cause = "in region: crop box dropped by edge rule"
                elif crop:
                    cause = "in region: crop score <= 0.25 (near threshold)"
                else:
                    cause = "in region: not in crop at all (>=0.05)"
        fn[(cls, cause)] += 1; fnlist[(cls, cause)].append((s, r.score))
        fix_add[cause].append((s, r, bi if bi >= 0 and bv >= 0.1 and dec != "full" else -1))
    for i in unmatched_c:
        if i in paired_c: continue
        c = C[i]; cb = (c.x1,c.y1,c.x2,c.y2); cls = MAJOR[c.class_id]
        dup = any(k != i and C[k].class_id == c.class_id and iou(cb, (C[k].x1,C[k].y1,C[k].x2,C[k].y2)) > 0.3 for k in range(len(C)))
        anyref = max([iou(cb, (r.x1,r.y1,r.x2,r.y2)) for r in R if r.class_id == c.class_id] or [0])
        oref = [x for x in full.detections[s] if x.class_id != c.class_id and iou(cb, (x.x1,x.y1,x.x2,x.y2)) >= 0.8]
        if dec == "full": cause = "full-frame FP (noise)"
        elif oref and anyref < 0.5: cause = "relabelled: reference has another class on it (IoU>=0.8)" + (" [cached]" if c.cached else " [fresh]")
        elif dup: cause = ("cached" if c.cached else "fresh") + " duplicate of another box (IoU>0.3)"
        elif c.cached: cause = "cached box, object gone/flickered off in ref" + (f" (ref IoU {anyref:.1f})" if anyref > 0 else "")
        else: cause = "fresh crop box, ref has none (score above thr in crop only)"
        fp[(cls, cause)] += 1; fplist[(cls, cause)].append((s, c.score))
        fix_drop[cause].add((s, id(c)))
print("FALSE NEGATIVES (reference objects unmatched at IoU 0.5), person/car/truck")
for (cls, cause), n in sorted(fn.items(), key=lambda kv: -kv[1]):
    sc = [x[1] for x in fnlist[(cls, cause)]]
    print(f"  {cls:7s} {n:4d}  ref score median {np.median(sc):.2f} (<0.4: {sum(x<0.4 for x in sc)})  {cause}")
print("FALSE POSITIVES (candidate boxes unmatched), person/car/truck")
for (cls, cause), n in sorted(fp.items(), key=lambda kv: -kv[1]):
    sc = [x[1] for x in fplist[(cls, cause)]]
    print(f"  {cls:7s} {n:4d}  cand score median {np.median(sc):.2f} (>=0.5: {sum(x>=0.5 for x in sc)})  {cause}")
# oracle: fix one cause at a time, recompute AP
def arr(ds): return np.array([[x.x1, x.y1, x.x2, x.y2, x.score, x.class_id] for x in ds], np.float64).reshape(-1, 6)
ref = [arr(full.detections[s]) for s in seqs]
def ev(causes_fn=(), causes_fp=()):
    add = defaultdict(list); drop = set(); dropc = set()
    for cz in causes_fn:
        for s, r, bi in fix_add[cz]:
            add[s].append(r)
            if bi >= 0: dropc.add((s, bi))
    for cz in causes_fp: drop |= fix_drop[cz]
    cl = []
    for s in seqs:
        C = list(cand.detections.get(s, ()))
        Cm = [x for x in C if x.class_id in MAJOR]
        keep = [x for x in C if (s, id(x)) not in drop]
        # dropc indexes into major-class list C (as built above)
        if dropc:
            bad = {id(Cm[i]) for (ss, i) in dropc if ss == s}
            keep = [x for x in keep if id(x) not in bad]
        cl.append(arr(keep + add[s]))
    m = evaluate(ref, cl, [str(i) for i in range(80)])
    per = {c.class_id: c.ap50 for c in m.classes}
    return m.map50_weighted, per
base, per = ev()
print(f"\nORACLE (each cause fixed alone: its misses given the reference box, its FPs removed): base ow {base:.4f} person {per[0]:.4f} car {per[2]:.4f} truck {per[7]:.4f}")
causes = sorted({c for _, c in fn} | {c for _, c in fp})
for cz in causes:
    w, p = ev([cz] if cz in fix_add else [], [cz] if cz in fix_drop else [])
    print(f"  +{w-base:.4f} ow  person {p[0]-per[0]:+.4f} car {p[2]-per[2]:+.4f} truck {p[7]-per[7]:+.4f}  {cz}")
w, p = ev(list(fix_add), list(fix_drop))
print(f"  all fixed: ow {w:.4f}")
pickle.dump({"fn": dict(fnlist), "fp": dict(fplist)}, open(sys.argv[1] + ".err", "wb"))
