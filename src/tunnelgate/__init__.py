"""tunnelgate: a reverse TCP tunnel."""

__version__ = "0.1.0"
