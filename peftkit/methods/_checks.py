"""Value checks that need no model, for the methods' `Config.__post_init__`.

Each raises a one-line `UserError` naming the key, the value and what is allowed, so a bad option
stops `methods.build` before any model loads or any file is written. Checks that need the model's
shapes or modules (a rank against min(out, in), a block count against in_features, layer indices)
stay in the methods' `wrap` / `apply`.
"""

from __future__ import annotations

from peftkit.errors import UserError


def at_least(key: str, value: int, least: int = 1) -> None:
    if value < least:
        raise UserError(f"method.{key} must be at least {least}, got {value}")


def positive(key: str, value: float) -> None:
    """For scales and inits where 0 trains nothing and a negative value crashes or trains nothing."""
    if not value > 0:
        raise UserError(f"method.{key} must be positive, got {value}")


def non_negative(key: str, value: float) -> None:
    if value < 0:
        raise UserError(f"method.{key} must be at least 0, got {value}")


def dropout(value: float, key: str = "dropout") -> None:
    """torch refuses p outside [0, 1]; p = 1 zeroes the adapter's input, so it never trains."""
    if not 0 <= value < 1:
        raise UserError(f"method.{key} must be in [0, 1), got {value}")


def one_of(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {what} '{value}'; choose one of: {', '.join(choices)}")
