"""mManager hub: the CLI and what the hub and the controllers share."""

__version__ = "0.1.0"
