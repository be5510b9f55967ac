"""Argument types shared by the CLI's verbs (``cli`` and ``explain_command``), kept apart so neither imports the other."""
from __future__ import annotations

import argparse
from typing import Callable


def count_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum`` (a 0 is refused, never replaced by a default)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse
