"""The one exception type the data pipeline raises for user-fixable problems."""


class DataError(Exception):
    """A data problem the user can fix (missing files, bad config, corrupt input).

    The message is a single line meant to be shown as-is by the CLI.
    """
