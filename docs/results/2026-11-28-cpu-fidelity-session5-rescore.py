import json, sys
from pathlib import Path
import numpy as np
from daemon.delta.evaluate import load_record
from daemon.delta.fidelity_cli import _arrays
from daemon.fidelity.metrics import evaluate
full = load_record(Path("/tmp/s5/ref.json")); seqs = sorted(full.detections); ref = _arrays(full, seqs)
names = [str(i) for i in range(80)]
names[0]="person"; names[2]="car"; names[7]="truck"; names[14]="bird"; names[30]="skis"; names[29]="frisbee"
recs = json.loads(Path(sys.argv[1]).read_text())
def arrs(rec, f):
    out = []
    for s in seqs:
        ds = rec["dets"].get(str(s), [])
        a = np.array([f(d) for d in ds], np.float64).reshape(-1, 6)
        out.append(a)
    return out
ages = [d[7] for r in recs for ds in r["dets"].values() for d in ds if d[6]]
print("cached ages: n", len(ages), "pcts", np.percentile(ages, [10, 50, 90, 99]) if ages else None)
thr = 0.25
variants = {"asis": lambda d: d[:6]}
for h in [0.3, 0.5, 1.0, 2.0]:
    variants[f"toward-thr h={h}s"] = (lambda h: lambda d: [*d[:4], thr + (d[4]-thr) * 0.5 ** (d[7]/h) if d[6] else d[4], d[5]])(h)
for h in [0.5, 1.0, 2.0]:
    variants[f"mult h={h}s"] = (lambda h: lambda d: [*d[:4], d[4] * 0.5 ** (d[7]/h) if d[6] else d[4], d[5]])(h)
variants["cached-last (score-1 if cached)"] = lambda d: [*d[:4], d[4] - 1.0 if d[6] else d[4], d[5]]
for name, f in variants.items():
    res = []
    for r in recs:
        m = evaluate(ref, arrs(r, f), names)
        cl = {c.name: c.ap50 for c in m.classes}
        res.append((m.map50_weighted, cl.get("person"), cl.get("truck"), cl.get("car"), cl.get("bird"), cl.get("skis"), cl.get("frisbee")))
    a = np.array(res, float)
    print(f"{name:34s} ow {a[:,0].mean():.4f} ({a[:,0].min():.4f}-{a[:,0].max():.4f})  person {a[:,1].mean():.3f} truck {a[:,2].mean():.3f} car {a[:,3].mean():.3f} bird {a[:,4].mean():.3f} skis {a[:,5].mean():.3f} frisbee {a[:,6].mean():.3f}")
