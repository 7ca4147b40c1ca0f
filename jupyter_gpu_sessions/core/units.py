"""Parsing of sizes ("8GiB"), CPU counts and GPU counts, with errors that name the bad value."""

from __future__ import annotations

import math
import re

from .errors import InvalidRequest

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_SIZE_HINT = "use a whole number of bytes or a number with a unit, such as 512MiB, 8GiB or 8G"


MAX_SIZE = 1 << 60  # 1 EiB: more than any machine or volume this runs on


def _as_float(value: int | float, what: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise InvalidRequest(f"{what} {value!r} is too large") from None


def parse_size(value: str | int | float, *, what: str = "size", minimum: int = 1) -> int:
    """Return ``value`` in bytes. Accepts ints and strings like ``"8GiB"``, ``"1.5G"``, ``"512m"``.

    Decimal units (k, M, G, T, with or without B) are powers of 1000; binary units
    (Ki, Mi, Gi, Ti, with or without B) are powers of 1024, as in Kubernetes.
    """
    if isinstance(value, bool):
        raise InvalidRequest(f"{what} {value!r} is not a size: {_SIZE_HINT}")
    if isinstance(value, int):
        number, unit = value, ""
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise InvalidRequest(f"{what} {value!r} is not a whole number of bytes: {_SIZE_HINT}")
        number, unit = value, ""
    else:
        match = _SIZE_RE.match(str(value))
        if not match:
            raise InvalidRequest(f"{what} {value!r} is not a size: {_SIZE_HINT}")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit not in _SIZE_UNITS:
            raise InvalidRequest(
                f"{what} {value!r} has an unknown unit {match.group(2)!r}: {_SIZE_HINT}"
            )
    # Whole numbers stay exact (a float would round 2**60 + 1 down to the limit).
    size = number if isinstance(number, int) else int(number * _SIZE_UNITS[unit])
    if size > MAX_SIZE:
        raise InvalidRequest(f"{what} {value!r} is too large: it may be at most 1EiB")
    if size < minimum:
        raise InvalidRequest(
            f"{what} {value!r} is too small: it must be at least {format_size(minimum)}"
        )
    return size


def format_size(size: int) -> str:
    """``8589934592`` → ``"8GiB"``; the inverse of :func:`parse_size` for binary units."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            number = size / factor
            text = f"{number:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{size}B"


def parse_cpus(value: str | int | float, *, what: str = "cpus") -> float:
    """A CPU count: a positive number, fractions allowed down to 0.01 (Docker's granularity)."""
    if isinstance(value, bool):
        raise InvalidRequest(f"{what} {value!r} is not a number of CPUs")
    try:
        cpus = _as_float(value, what)
    except (TypeError, ValueError):
        raise InvalidRequest(
            f"{what} {value!r} is not a number of CPUs: use a positive number such as 1, 2 or 0.5"
        ) from None
    if not math.isfinite(cpus) or cpus < 0.01:
        raise InvalidRequest(
            f"{what} {value!r} is out of range: use a positive number of CPUs, at least 0.01"
        )
    return cpus


def parse_count(value: str | int, *, what: str, minimum: int = 0, maximum: int = 1024) -> int:
    """A whole count (GPUs, pids) between ``minimum`` and ``maximum``."""
    if isinstance(value, bool):
        raise InvalidRequest(f"{what} {value!r} is not a whole number")
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{what} {value!r} is not a whole number") from None
    if isinstance(value, float) and value != count:
        raise InvalidRequest(f"{what} {value!r} is not a whole number")
    if not minimum <= count <= maximum:
        raise InvalidRequest(f"{what} {value!r} is out of range: use {minimum} to {maximum}")
    return count


_DURATION_UNITS = {
    "s": 1,
    "sec": 1,
    "m": 60,
    "min": 60,
    "h": 3600,
    "hr": 3600,
    "d": 86400,
    "w": 7 * 86400,
    "mo": 30 * 86400,
    "y": 365 * 86400,
    "yr": 365 * 86400,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: str | int | float, *, what: str = "duration") -> float:
    """Seconds from ``"90s"``, ``"15m"``, ``"12h"``, ``"30d"``, ``"2w"``, ``"6mo"``, ``"1yr"``
    or a plain number of seconds."""
    if isinstance(value, bool):
        raise InvalidRequest(f"{what} {value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = _as_float(value, what)
    else:
        match = _DURATION_RE.match(str(value))
        unit = match.group(2).lower() if match else None
        if not match or unit not in {"", *_DURATION_UNITS}:
            raise InvalidRequest(
                f"{what} {value!r} is not a duration: use a number with a unit, such as "
                "90s, 15m, 12h, 30d, 6mo or 1yr"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS.get(unit, 1)
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidRequest(f"{what} {value!r} must be a positive duration")
    return seconds
