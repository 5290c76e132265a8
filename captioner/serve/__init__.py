"""Serving: an HTTP endpoint with micro-batching and a page to try a model
(:mod:`captioner.serve.app`), over a run directory or an exported SavedModel
(:mod:`captioner.serve.backends`)."""
