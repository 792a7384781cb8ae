"""GPPF platform: multi-task, multi-dataset vision pre-training on Ray (import name `gppf`)."""

__version__ = "0.1.0"
