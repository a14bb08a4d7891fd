"""deltayolo cluster layer (Ray Serve). Builds on `daemon`'s public pieces; `daemon` never imports it."""
