"""The loopback HTTP endpoint: /healthz, /metrics, /preview/{camera}."""
