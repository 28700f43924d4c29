"""A GPT trained with power retention."""

__version__ = "2.0.0.dev0"
