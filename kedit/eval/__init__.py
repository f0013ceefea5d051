"""Measuring edits: metric functions, evaluating a revision, and the probe suite of `kedit check`."""
