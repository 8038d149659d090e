"""The one error a user sees as a single line, and how to find it inside Ray's wrapping."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator


class UserError(Exception):
    """A problem with the user's input or configuration: printed as one line, no traceback."""


# Ray may carry a remote exception only as traceback text: "<module>.UserError: <message>".
_REMOTE = re.compile(rf"{re.escape(UserError.__module__)}\.{UserError.__qualname__}: (.+)")


def find_user_error(exc: BaseException) -> UserError | None:
    """The `UserError` that caused `exc`, following Ray's exception wrapping, or None."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    match = _REMOTE.search(str(exc))
    return UserError(match.group(1).strip()) if match else None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise a `UserError` that Ray wrapped (a stage's task, actor or train worker raised it)
    as itself, so the command prints its one line instead of Ray's traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        user = find_user_error(e)
        if user is not None:
            raise UserError(str(user)) from e
        raise
