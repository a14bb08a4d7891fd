"""Known models and data sets, fetched from package registries and verified by sha256."""
