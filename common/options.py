"""Command-line options checked as config fields are: argparse types that refuse a bad value with a message naming
the option and the range, and a parser whose every error is a `UserError` (one line, exit 2, no usage dump).

    parser = OneLineParser(prog="competesmoe")
    parser.add_argument("--batch-size", type=integer(1), default=8)        # 0, -3 or 'x': one line, exit 2
    parser.add_argument("--mfu", type=number(0, 1, low_open=True))          # nan, inf, 0 or 1.5: likewise
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable

from competesmoe.common.errors import UserError

PORT_RANGE = (1, 65535)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises UserError (the command prints one line and exits 2) instead of
    printing the usage and exiting; its sub-parsers are of this class too."""

    def error(self, message: str):
        raise UserError(f"{message} ({self.prog} --help)")


def _range_text(low, high, low_open: bool) -> str:
    if high is None:
        return f"{'above' if low_open else 'at least'} {low}"
    if low is None:
        return f"at most {high}"
    return f"within {'(' if low_open else '['}{low}, {high}]"


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number within [low, high] (either bound may be None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} must be {_range_text(low, high, False)}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number within [low, high] ((low, high] with low_open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        below = low is not None and (value <= low if low_open else value < low)
        if below or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value:g} must be {_range_text(low, high, low_open)}")
        return value

    parse.__name__ = "number"
    return parse


port = integer(*PORT_RANGE)
"""An argparse type: a TCP port, 1..65535."""


def matching(pattern: re.Pattern, what: str) -> Callable[[str], str]:
    """An argparse type: text that matches `pattern` (what: how the message describes such text)."""

    def parse(text: str) -> str:
        if not pattern.match(text):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return text

    parse.__name__ = "text"
    return parse
