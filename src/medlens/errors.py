"""One exception type whose message is the one line a user sees."""


class MedlensError(ValueError):
    """A problem with the user's input, model or arguments, described in one line."""


def one_line(error: BaseException) -> str:
    """A one-line message for the user: a MedlensError's own text, else the exception's type and
    the first line of its message (a model failing on an input raises RuntimeError)."""
    if isinstance(error, MedlensError):
        return str(error)
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__
