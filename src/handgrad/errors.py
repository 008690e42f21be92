"""The one exception type the command line turns into a one-line error."""


class HandgradError(Exception):
    """A user-facing error: bad input, a bad flag, a broken checkpoint.

    The CLI prints ``handgrad: error: <message>`` and exits non-zero, with no
    traceback. Code deeper down raises it with a message a user can act on.
    """
