"""The one exception type for problems the user can fix (bad config, bad data file, bad prompt)."""


class UserError(ValueError):
    """Its message is shown as is, on one line, naming the file:line or key and what is allowed; exit code 2."""
