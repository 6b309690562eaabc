"""The one exception that stops a run with one clear line."""


class Fatal(Exception):
    """Stops the run with one clear line (exit status 2)."""
