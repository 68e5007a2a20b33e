"""Errors that name a problem with the user's input and how to fix it (the CLI prints them without a traceback)."""


class CamRetrievalError(Exception):
    """Base class of camretrieval's user-facing errors."""
