"""The project's one domain exception."""


class RiffusionError(ValueError):
    """Bad input or an unusable configuration; the message names the bad value."""
