__version__ = "0.1.0"  # the one version of the distribution (pyproject.toml reads it)
