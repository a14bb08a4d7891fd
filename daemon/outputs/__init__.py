"""Local outputs (JSON lines to a file or stdout). MQTT lives in daemon.publish."""
