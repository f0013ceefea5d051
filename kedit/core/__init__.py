"""The engine: objects, the history database, refs, replay and the Repository (git's plumbing).

It imports nothing from the layers above it (kedit.model, kedit.edit, kedit.eval, kedit.hub,
kedit.cli) nor from any method; `tests/test_layout.py` checks this.
"""
