"""rhlens' version (recorded in every saved result and run)."""

__version__ = "0.1.0"
