"""Stock splits: the model the simulator serves and the price arithmetic they imply.

The generated series `p(t)` (daemon.simulator.data) is the *fully adjusted* price. A split
`(ticker, D, split_from, split_to)` means the raw price before D's ET midnight was higher by
`split_to / split_from` (a 10-for-1 split, from 1 to 10: ten times higher) and the raw volume
lower by the inverse. So, with every split S of the ticker and its hidden subset H:

    raw(t)            = p(t) * prod(to/from for S with t < D)    served for adjusted=false
    adjusted(t)       = p(t) * prod(to/from for H with t < D)    served for adjusted=true

i.e. adjusted=true is adjusted for the *visible* (announced) splits only, as the real API is
adjusted for the splits known when the request is made. Announcing a hidden split therefore
changes the adjusted bars before D, exactly as the real API's history changes after a split.

Rounding, defined once here (`scale_bar`): a bar with factor f != 1 gets `o h l c vw` as
`round(x * f, 4)` (floored at 0.0001, so no price becomes 0), `v` as `round(v / f, 4)`, and
`n`, `t` unchanged; a bar with f == 1 is left exactly as generated. Rounding is monotone and f
is positive, so `l <= o, c <= h` still holds for every scaled bar. Week, month and multi-day
bars aggregate the scaled daily bars (see data), so a bar straddling D is consistent with them.

Error handling: `Split` validates on construction (positive factors, a ticker, a date) and
raises ValueError; everything else is pure arithmetic.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence

import attrs

from ..market_calendar import et_midnight_ms

__all__ = ["MIN_PRICE", "NO_ADJUSTMENT", "Adjustment", "Split", "adjustment", "scale_bar",
           "sort_key", "visible"]

# Scaled prices are rounded to this many decimals, volumes too (the API's finest quote).
DECIMALS = 4
# No scaled price rounds below this: a reverse split must not make a price 0.
MIN_PRICE = 0.0001
_PRICE_FIELDS = ("o", "h", "l", "c", "vw")


def _date(value: dt.date | str) -> dt.date:
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(value)


def _positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive: {value}")


def _number(value: float) -> float | int:
    """Integral factors as ints, as the API sends them (`"split_to": 10`)."""
    return int(value) if float(value).is_integer() else float(value)


@attrs.frozen
class Split:
    """One split of `ticker` executed on `execution_date` (bars before its ET midnight move).

    `hidden`: not yet announced, so neither listed by /v3/reference/splits nor applied to
    `adjusted=true` bars (see the module docstring).
    """

    ticker: str = attrs.field(validator=attrs.validators.min_len(1))
    execution_date: dt.date = attrs.field(converter=_date)
    split_from: float = attrs.field(converter=float, validator=_positive)
    split_to: float = attrs.field(converter=float, validator=_positive)
    hidden: bool = False

    @property
    def id(self) -> str:
        """A stable id shaped like the API's (`E` + 64 hex digits)."""
        key = f"{self.ticker}|{self.execution_date}|{self.split_from:g}|{self.split_to:g}"
        return "E" + hashlib.blake2b(key.encode(), digest_size=32).hexdigest()

    @property
    def boundary_ms(self) -> int:
        """ET midnight of the execution date: bars with `t` before it are scaled."""
        return et_midnight_ms(self.execution_date)

    @property
    def price_ratio(self) -> float:
        """How much higher the raw price was before the split than after."""
        return self.split_to / self.split_from

    def as_json(self) -> dict[str, object]:
        """The /v3/reference/splits result row."""
        return {"execution_date": self.execution_date.isoformat(),
                "split_from": _number(self.split_from), "split_to": _number(self.split_to),
                "ticker": self.ticker, "id": self.id}


@attrs.frozen
class Adjustment:
    """The price factor of every `t` for one ticker: a step function falling to 1 at the end.

    `boundaries` ascend; `factors[i]` applies to `t` with `boundaries[i-1] <= t < boundaries[i]`
    (the product of the ratios of the splits whose boundary is after `t`); `factors[-1] == 1`.
    """

    boundaries: tuple[int, ...] = ()
    factors: tuple[float, ...] = (1.0,)

    def __bool__(self) -> bool:
        return bool(self.boundaries)

    def factor(self, t: int) -> float:
        return self.factors[bisect.bisect_right(self.boundaries, t)]

    @property
    def key(self) -> tuple[tuple[int, float], ...]:
        """Everything that changes served bars: for cache keys."""
        return tuple(zip(self.boundaries, self.factors, strict=False))


NO_ADJUSTMENT = Adjustment()


def adjustment(splits: Iterable[Split], ticker: str, *, adjusted: bool) -> Adjustment:
    """The factors `ticker`'s bars get: all its splits for raw, only hidden ones for adjusted."""
    chosen = sorted((s for s in splits if s.ticker == ticker and (s.hidden or not adjusted)),
                    key=lambda s: s.execution_date)
    if not chosen:
        return NO_ADJUSTMENT
    boundaries = tuple(s.boundary_ms for s in chosen)
    factors = [1.0]
    for split in reversed(chosen):  # suffix products, latest split first
        factors.append(factors[-1] * split.price_ratio)
    factors.reverse()
    return Adjustment(boundaries, tuple(factors))


def scale_bar(bar: dict[str, float | int], factor: float) -> dict[str, float | int]:
    """A copy of `bar` with prices times `factor` and volume divided by it (rounding above)."""
    out = dict(bar)
    for name in _PRICE_FIELDS:
        if name in out:
            out[name] = max(round(out[name] * factor, DECIMALS), MIN_PRICE)
    out["v"] = round(out["v"] / factor, DECIMALS)
    return out


def sort_key(split: Split, by: str) -> tuple[str, str, str]:
    """The listing order for `sort=execution_date` or `sort=ticker`; ids break ties."""
    date = split.execution_date.isoformat()
    return (date, split.ticker, split.id) if by == "execution_date" else (
        split.ticker, date, split.id)


def visible(splits: Sequence[Split]) -> list[Split]:
    return [s for s in splits if not s.hidden]
