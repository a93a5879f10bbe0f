"""The command line's output: plain consoles and the one-line error of every command."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, TypeVar

import asyncpg
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from shared.consumer import validation_summary

# Plain output: user text (article names, till names) is printed as it is, never read as
# Rich markup or emoji codes.
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)
out = Console(soft_wrap=True, markup=False, emoji=False, highlight=False)

# Every error of tillsync's own is a RuntimeError or ValueError (AccountError, TillStoreError,
# SetupError, BrokerAdminError, BakeryFormatError ...).
KNOWN_ERRORS = (ValidationError, OSError, asyncpg.PostgresError, RuntimeError, ValueError)

F = TypeVar("F", bound=Callable[..., Any])


def error_line(message: str) -> None:
    """Print ``error: <message>`` on stderr."""
    err.print(Text("error: ", style="red") + Text(message))


def friendly(func: F) -> F:
    """Turn the known errors into one red line (plus the error's ``details``) and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KNOWN_ERRORS as exc:
            if isinstance(exc, ValidationError):
                message = f"invalid {words(exc.title)}: {validation_summary(exc)}"
            elif isinstance(exc, OSError) and exc.strerror:
                message = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
            else:
                message = str(exc)
            error_line(message)
            for detail in getattr(exc, "details", ()):
                if detail not in message:
                    err.print(f"  - {detail}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def words(model_name: str) -> str:
    """``SharedSetting`` → ``shared setting``: a model's name as the user's words."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", model_name).lower()
