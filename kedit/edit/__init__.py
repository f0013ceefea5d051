"""Editing a repository's model: running a method and committing its deltas, trained editors, request files."""
