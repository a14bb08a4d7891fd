"""Per-camera and per-node counters, latency percentiles and bandwidth figures."""
