"""The package's version: the one place it is written (pyproject.toml
reads it through hatch's version source, ``crownest.__version__`` imports it)."""

__version__ = "0.1.0"
