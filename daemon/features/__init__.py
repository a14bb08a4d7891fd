"""Reference feature caches: the model split at its backbone, splicing of changed regions, feature deltas."""
