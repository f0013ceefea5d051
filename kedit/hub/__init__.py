"""Sharing through the Hugging Face Hub: the layout of a pushed repository, the client, fetch, model cards, remotes."""
