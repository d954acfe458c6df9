"""The base of every error a user can fix: the CLI prints its one-line message without a traceback."""


class UnfusedError(Exception):
    pass


class MissingArtefactError(UnfusedError, FileNotFoundError):
    """A stage's input that an earlier stage writes is not there: the message names the stage to run first."""


class ConfigError(UnfusedError, ValueError):
    """A bad config file, key or value; the message is one line a user can act on."""
