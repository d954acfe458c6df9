"""The base of every error a user can fix: the CLI prints its one-line message without a traceback."""


class UnfusedError(Exception):
    pass
