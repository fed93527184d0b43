"""The one exception type that means "the user's input is wrong", not "the code is wrong".

``train.py`` catches it and prints its message as one line (``error: ...``) with exit status 2,
instead of a traceback. Raise it with a message that names the problem and the fix.
"""

__all__ = ["TrainingStopped", "UserError"]


class UserError(ValueError):
    """A configuration or input problem the user can fix; the message says how."""


class TrainingStopped(UserError):
    """A run stopped on purpose while training (e.g. non-finite numbers): one line too, but what the run
    wrote so far (logs, checkpoints) stays for the user to inspect."""
