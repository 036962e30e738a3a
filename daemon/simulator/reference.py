"""`GET /v3/reference/splits`: the visible splits, filtered, sorted and paged like the real API.

Parameters: `ticker` (and `ticker.gte/.gt/.lte/.lt`), `execution_date` (and
`execution_date.gte/.gt/.lte/.lt`, `YYYY-MM-DD`), `reverse_split` (`true`: only splits with
`split_from > split_to`), `limit` (default 10, 1 to 1000), `sort` (`execution_date`, the
default, or `ticker`), `order` (`asc`, the default here, or `desc`). Unknown parameters are
ignored, as the real API does.

Paging is v3-style: while more splits match, the body has an absolute `next_url` whose only
parameter is an opaque `cursor` (the filters plus the sort key of the last split served; no
key: re-send it). Keyset rather than offset paging, so a split announced between two pages
neither repeats nor hides one already listed.

Error handling: a malformed parameter raises ValueError with the message the 400 body carries.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode

import attrs

from .splits import Split, sort_key

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "SplitsPage", "list_splits"]

DEFAULT_LIMIT = 10
MAX_LIMIT = 1000
_RANGES = ("gte", "gt", "lte", "lt")
_SEP = "|"


@attrs.frozen
class SplitsPage:
    results: list[dict[str, object]]
    cursor: str | None  # the next page's `cursor`, None on the last page


def _decode_cursor(params: dict[str, str]) -> dict[str, str]:
    if "cursor" not in params:
        return params
    text = params["cursor"]
    try:
        decoded = dict(parse_qsl(base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_",
                                                  validate=True).decode(),
                                 keep_blank_values=True, strict_parsing=True))
    except ValueError:
        decoded = {}
    if "after" not in decoded:  # every cursor we hand out carries where the page ended
        raise ValueError("Invalid cursor")
    rest = {k: v for k, v in params.items() if k != "cursor"}
    return {**decoded, **rest}


def _date(params: dict[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise ValueError(f"Could not parse {name}: '{value}'. Use YYYY-MM-DD") from None


def _compare(value: str, op: str, bound: str) -> bool:
    return {"gte": value >= bound, "gt": value > bound, "lte": value <= bound,
            "lt": value < bound}[op]


def list_splits(splits: Sequence[Split], params: dict[str, str]) -> SplitsPage:
    """One page of the visible `splits` matching the query `params` (cursor included)."""
    params = _decode_cursor(params)
    limit_text = params.get("limit", str(DEFAULT_LIMIT))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
        raise ValueError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    order = params.get("order", "asc").lower()
    by = params.get("sort", "execution_date").lower()
    if order not in ("asc", "desc"):
        raise ValueError("order must be asc or desc")
    if by not in ("execution_date", "ticker"):
        raise ValueError("sort must be execution_date or ticker")
    reverse = params.get("reverse_split")
    if reverse is not None and reverse.lower() not in ("true", "false"):
        raise ValueError("reverse_split must be true or false")
    dates = {op: _date(params, f"execution_date.{op}") for op in _RANGES}
    exact_date = _date(params, "execution_date")
    tickers = {op: params.get(f"ticker.{op}") for op in _RANGES}

    def wanted(split: Split) -> bool:
        date = split.execution_date.isoformat()
        if split.hidden or ("ticker" in params and split.ticker != params["ticker"]):
            return False
        if exact_date is not None and date != exact_date:
            return False
        if reverse is not None and (split.split_from > split.split_to) != (reverse == "true"):
            return False
        return (all(b is None or _compare(date, op, b) for op, b in dates.items())
                and all(b is None or _compare(split.ticker, op, b) for op, b in tickers.items()))

    chosen = sorted((s for s in splits if wanted(s)), key=lambda s: sort_key(s, by),
                    reverse=order == "desc")
    after = params.get("after")
    if after is not None:
        last = tuple(after.split(_SEP))
        chosen = [s for s in chosen
                  if (sort_key(s, by) < last if order == "desc" else sort_key(s, by) > last)]
    page = chosen[: int(limit_text)]
    cursor = None
    if len(chosen) > len(page):
        carried = {k: v for k, v in params.items() if k not in ("after", "apiKey")}
        carried["after"] = _SEP.join(sort_key(page[-1], by))
        cursor = base64.urlsafe_b64encode(urlencode(carried).encode()).decode().rstrip("=")
    return SplitsPage([s.as_json() for s in page], cursor)
