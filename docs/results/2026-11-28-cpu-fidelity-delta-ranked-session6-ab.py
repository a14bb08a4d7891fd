"""A/B: the delta replay with and without a rank floor, alternating (published view, rows and pixels saved, engine and post time). Run from the repo root: DELTAYOLO_CACHE=.devcache PYTHONPATH=. python3 THIS N (N rounds; needs /tmp/s6/ref.json from fidelity-delta --reference-cache)."""
import sys
import numpy as np
from pathlib import Path
from daemon.backend import build_engine
from daemon.cameras import resolve_builtin
from daemon.config.model import DeltaConfig, ModelConfig
from daemon.delta.evaluate import load_record, replay_once
from daemon.delta.fidelity_cli import _arrays
from daemon.fidelity.metrics import evaluate
from daemon.sources.replay import load_jpeg_frames

import daemon.delta.evaluate as ev
POST = [0.0]
_orig = ev._Collect.publish_result
def _pr(self, result):
    POST[0] += result.times.post
    _orig(self, result)
ev._Collect.publish_result = _pr
frames = load_jpeg_frames(resolve_builtin("builtin:vtest"), 90)
full = load_record(Path("/tmp/s6/ref.json"))
seqs = sorted(full.detections)
ref = _arrays(full, seqs)
choice = build_engine(ModelConfig(path="builtin:yolov8n"), 8)
names = choice.engine.model.class_names
for rnd in range(int(sys.argv[1])):
    for floor in (None, 0.001):
        POST[0] = 0.0
        c = replay_once(choice, frames, DeltaConfig(enabled=True, keyframe_s=3600), 8, rank_floor=floor)
        m = evaluate(ref, _arrays(c, seqs), names)
        r = evaluate(ref, _arrays(c, seqs, ranked=True), names) if floor else None
        print(f"floor={floor} px saved {1 - np.mean(list(c.inferred.values())):.1%} rows saved "
              f"{1 - c.engine_rows / 795:.1%} post {POST[0]:.2f} s wall {c.wall_s:.1f} s engine {c.engine_s:.1f} s calls {sorted(c.batch_sizes.items())} published ow {m.map50_weighted:.4f} "
              + " ".join(f"{x.name}={x.ap50:.3f}" for x in m.major())
              + (f" | ranked ow {r.map50_weighted:.4f} " + " ".join(f"{x.name}={x.ap50:.3f}" for x in r.major())
                 if r else ""), flush=True)
