"""One exception type whose message is the one line a user sees."""


class MedlensError(ValueError):
    """A problem with the user's input, model or arguments, described in one line."""
