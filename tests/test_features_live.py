"""delta.mode features in the live pipeline (CPU path), with the real model and video: a features-mode camera's
REGIONS frames run the backbone on their regions and the head on the spliced reference maps, so their detections
cover the whole frame and follow a camera that infers every frame; the reference maps are kept per camera and
travel with an exported camera state."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import ResultCollector, boxes_found, vtest_jpegs

from daemon.app import Runtime
from daemon.config.loader import parse_config
from daemon.features.state import from_bytes
from daemon.sources.replay import ReplaySource as ReplayReader


@pytest.fixture(scope="module")
def frames(vtest_path: Path) -> list[bytes]:
    return vtest_jpegs(vtest_path, 40)


def test_features_mode_runs_live_and_its_maps_travel(model_path: Path, frames: list[bytes]) -> None:
    cfg = parse_config(
        "version: 1\nnode: {site: t, area: t, line: t, node: t}\n"
        f"model: {{path: {model_path}, threads: 2}}\ncameras:\n"
        "  - id: feat\n    source: {type: replay, path: x.avi, realtime: false, loop: false}\n"
        "    delta: {enabled: true, mode: features, feature_stream: true}\n"
        "  - id: every\n    source: {type: replay, path: x.avi, realtime: false, loop: false}\n"
        "batching: {max_batch: 4, max_wait_ms: 5}\nstats: {interval_s: 100}\n"
    )
    sink = ResultCollector()
    rt = Runtime(cfg, [sink], source_factory=lambda cam, to: ReplayReader(cam.id, "t", to, loop=False,
                                                                           realtime=False, frames=frames))
    rt.start()
    try:
        deadline = time.monotonic() + 240
        while not rt.all_ended() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        assert rt.feature_cache is not None and rt.feature_cache.get("feat") is not None
        state = from_bytes(rt.export_camera("feat"), time.monotonic())
        stats = {c.camera: c for c in rt.stats.snapshot([], 1.0).cameras}
    finally:
        rt.stop(20)
    assert state.features and state.signature is not None  # the reference maps travel with the camera
    feat = stats["feat"]
    print(f"\nfeature stream: {feat.feature_delta_bytes} bytes for {feat.feature_full_bytes} of FP32 maps "
          f"({feat.feature_delta_bytes / max(feat.feature_full_bytes, 1):.1%})")
    assert 0 < feat.feature_delta_bytes < 0.4 * feat.feature_full_bytes  # issue 6: <= 40 % of the full maps' bytes
    assert stats["every"].feature_delta_bytes == 0
    by = {(r.camera, r.seq): r for r in sink.results}
    assert sum(1 for k in by if k[0] == "feat") == len(frames) == sum(1 for k in by if k[0] == "every")
    regions = [by[("feat", i)] for i in range(len(frames)) if by[("feat", i)].decision == "regions"]
    assert len(regions) >= len(frames) // 3, [by[("feat", i)].decision for i in range(len(frames))]
    matched = total = 0
    for r in regions:
        assert 0.3 < r.inferred_fraction < 1.0  # the head always, the backbone on the regions only
        assert not r.cached
        total += len(by[("every", r.seq)].detections)
        matched += boxes_found(list(by[("every", r.seq)].detections), list(r.detections))
    print(f"regions frames {len(regions)}/{len(frames)}, every-frame boxes found {matched}/{total}, mean work "
          f"{np.mean([r.inferred_fraction for r in regions]):.0%}")
    assert total > 50 and matched / total > 0.95, (matched, total)
