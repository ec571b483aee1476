"""Errors a user can act on.

Every entry point raises :class:`QSMInputError` (a ``ValueError``) for bad input: missing file, wrong
shape, NaN, empty mask, mismatched geometry, unknown option. Its message is one line that names the
file, row or option at fault and what was expected; the CLI prints it as ``qsmlab: error: <message>``.
"""


class QSMInputError(ValueError):
    """Bad user input; the message is one line naming the file/row/option at fault."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
