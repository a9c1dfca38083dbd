"""User errors: bad input that ends a run with one clear line instead of a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class UserError(ValueError):
    """A mistake in the user's input (config value, file, checkpoint), reported as one line."""


class SolverError(UserError):
    """An integration that cannot finish: the NFE cap was reached or the step size underflowed (a diverged model, or
    a field made too large, such as by a huge guidance scale)."""


def choices_error(name: str, value: object, choices: Iterable[object]) -> UserError:
    """The one-line error for a value outside a fixed set of choices."""
    listed = ", ".join(str(c) for c in sorted(choices, key=str))
    return UserError(f"{name}={value!r} is not a valid choice; choose one of: {listed}")


def first_detail(error: BaseException) -> str:
    """A multi-line error message as one line: its first two lines (a heading and its first detail), and how many
    more details there are."""
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return " ".join(lines[:2]) + more


def find_user_error(error: BaseException) -> UserError | None:
    """The `UserError` behind `error`, following `raise ... from` chains (Hydra's instantiate wraps errors)."""
    while error is not None:
        if isinstance(error, UserError):
            return error
        error = error.__cause__
    return None


def exit_on_user_error(func: F) -> F:
    """Turn a `UserError` raised anywhere below an entry point into one line on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as error:
            user_error = find_user_error(error)
            if user_error is None:
                raise
            print(f"fmlab: error: {user_error}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
