"""vision-server: an on-demand Florence-2 / PromptGen v2.0 captioning daemon."""

__version__ = "0.1.0"
