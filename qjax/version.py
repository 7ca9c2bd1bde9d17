"""The qjax version (read by setup.cfg without importing JAX)."""

__version__ = "0.1.0"
