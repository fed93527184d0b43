"""Budget durations: ``90s``, ``30m``, ``24h``, ``1h30m`` or a number of seconds."""

from __future__ import annotations

import math
import re

from core.errors import UserError

__all__ = ["format_duration", "parse_duration"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd])")


def parse_duration(value: str | float | int) -> float:
    """Seconds in ``value``: a number of seconds, or a duration such as ``90s``, ``30m``, ``24h``, ``1h30m``.

    >>> parse_duration("1h30m")
    5400.0
    """
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise UserError(
                    f"cannot read the duration {value!r}: write a number of seconds or e.g. 90s, 30m, 24h, 1h30m"
                ) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"the duration {value!r} must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    """``5400 -> '1h30m00.0s'``, ``90 -> '1m30.0s'``."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{int(hours)}h{int(minutes):02d}m{secs:04.1f}s" if hours else f"{int(minutes)}m{secs:04.1f}s"
