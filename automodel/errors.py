"""The one exception type that reaches the user as a single line.

Anything the user can fix (a bad override, a layout that cannot work, a missing file, a model too large
for the machine) raises `UserError`. The CLI prints its message on one line and exits with code 2; every
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line naming what is wrong and what would be right."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # one line, always
