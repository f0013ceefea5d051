"""Models as transformers sees them: loading a revision, exporting a folder, architectures, adapters."""
