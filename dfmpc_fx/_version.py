"""The package version (base layer: importable from every layer)."""

__version__ = "0.2.0"
