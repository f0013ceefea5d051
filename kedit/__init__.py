"""kedit: version control for the knowledge inside a language model."""

__version__ = "0.1.0"
