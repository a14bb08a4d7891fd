import json, sys
from pathlib import Path
import numpy as np
from daemon.delta.evaluate import replay_once, load_record
from daemon.delta.fidelity_cli import _arrays
from daemon.backend import build_engine
from daemon.config.model import ModelConfig, DeltaConfig
from daemon.cameras import resolve_builtin
from daemon.sources.replay import load_jpeg_frames
from daemon.fidelity.metrics import evaluate

out = Path(sys.argv[1]); runs = int(sys.argv[2]); batch = int(sys.argv[3]); setting = json.loads(sys.argv[4])
frames = load_jpeg_frames(resolve_builtin("builtin:vtest"), 90)
choice = build_engine(ModelConfig(path="builtin:yolov8n"), batch)
full = load_record(Path("/tmp/s5/ref.json"))
seqs = sorted(full.detections)
recs = []
for i in range(runs):
    cand = replay_once(choice, frames, DeltaConfig(enabled=True, keyframe_s=3600, **setting), batch)
    recs.append({"rows": cand.engine_rows, "inferred": {str(s): v for s, v in cand.inferred.items()},
                 "dets": {str(s): [[d.x1, d.y1, d.x2, d.y2, d.score, d.class_id, int(d.cached), d.age_s] for d in ds]
                          for s, ds in cand.detections.items()}})
    m = evaluate(_arrays(full, seqs), _arrays(cand, seqs), choice.engine.model.class_names)
    print(i, cand.engine_rows, m.map50_weighted, [(c.name, round(c.ap50,3)) for c in m.major()], flush=True)
out.write_text(json.dumps(recs))
