"""moectl: train, measure, explain and export Mixture-of-Experts language models."""

__version__ = "0.1.0"
