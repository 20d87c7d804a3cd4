"""The version, in a module of its own: every module may read it without importing the package's front."""

__version__ = "0.1.0"
