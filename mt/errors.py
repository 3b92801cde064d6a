"""User-facing errors: anything raised as MTError is printed as one line and exits non-zero."""


class MTError(Exception):
    """Bad input or configuration the user can fix (printed as `error: <message>`, exit 2)."""


class DataError(MTError):
    """The corpus cannot be found, read or used (missing path, split, language column...)."""


class CheckpointError(MTError):
    """A checkpoint is missing, corrupt, or does not fit the current configuration."""


class TrainingDiverged(MTError):
    """The loss became NaN or inf; training stopped and the last good checkpoint was kept."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:limit]
