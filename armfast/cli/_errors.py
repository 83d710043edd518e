"""How the command line reports an exception: one line, and whether it is the user's to fix."""
from __future__ import annotations

# what a user's input or machine causes (a path, a value, a download, a diverging run): their
# message is the whole report; anything else is a bug and says so
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)


def error_message(exc: BaseException) -> str:
    """One line for an exception: its message (an OSError's reason and file, without the
    errno prefix), and for an unexpected kind, its type and where to report it."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + "".join(f": {f}" for f in (exc.filename, exc.filename2) if f)
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    if not isinstance(exc, USER_ERRORS):
        text = (f"{type(exc).__name__}: {text} (unexpected: rerun with --debug for the "
                f"traceback and report it)")
    return text
