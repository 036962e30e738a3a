"""A page's one-pass check and encoding (daemon.bars.check_and_encode) against the two-pass
reference (check_bars, then encode_copy_rows): every page is judged and encoded alike,
whichever path takes it."""

from __future__ import annotations

import math
import random

import msgspec

from daemon.bars import (
    Bar,
    Quarantined,
    check_and_encode,
    check_bars,
    decode_page,
    encode_copy_rows,
)

FROM = 1_704_171_600_000  # 2024-01-02 ET midnight
STEP = 300_000
TO = FROM + 1_000 * STEP
PAST_64_BITS = "a value out of range for the database (trade count past 64 bits)"


def defective(rng: random.Random, t: int) -> Bar:
    """A bar, sound or with one defect of each kind check_bars names, or one the encoder
    refuses (a trade count past 64 bits). NaN and the infinities cannot come in JSON (msgspec
    refuses a number past float8), but a Bar can hold them, and the checks must catch them."""
    o, c = 10.0 + rng.random(), 10.0 + rng.random()
    bar = Bar(t=t, o=o, h=max(o, c) + 0.5, l=min(o, c) - 0.5, c=c, v=1_000.0 * rng.random(),
              vw=o if rng.random() < 0.8 else None,
              n=rng.randrange(1, 100) if rng.random() < 0.8 else None)
    kind = rng.randrange(16)
    if kind == 0:
        return msgspec.structs.replace(bar, **{rng.choice("ohlcv"): rng.choice(
            [math.nan, math.inf, -math.inf])})
    if kind == 1:
        return msgspec.structs.replace(bar, h=bar.l, l=bar.h)
    if kind == 2:
        return msgspec.structs.replace(bar, **{rng.choice("oc"): bar.h + 1.0})
    if kind == 3:
        return msgspec.structs.replace(bar, v=-1.0)
    if kind == 4:
        return msgspec.structs.replace(bar, vw=rng.choice([math.nan, math.inf]))
    if kind == 5:
        return msgspec.structs.replace(bar, n=rng.choice([-1, 2**63, 2**64 - 1]))
    return bar


def reference(bars: list[Bar]) -> tuple[list[Bar], list[tuple[int | None, str]], bytes]:
    good, bad = check_bars(bars, FROM, TO)
    rows, unfit = encode_copy_rows(good, "SPY", "5m")
    quarantined = [(q.t, q.reason) for q in bad] + [(b.t, PAST_64_BITS) for b in unfit]
    return [b for b in good if b not in unfit], quarantined, bytes(rows.payload)


def judged(bars: list[Bar]) -> tuple[list[Bar], list[Quarantined], bytes]:
    good, bad, rows = check_and_encode(bars, FROM, TO, "SPY", "5m")
    assert rows.count == len(good) and rows.series == ("SPY", "5m")
    assert (rows.first_t, rows.last_t) == ((good[0].t, good[-1].t) if good else (0, 0))
    return good, bad, bytes(rows.payload)


def test_one_pass_and_two_passes_agree_on_every_bar() -> None:
    rng = random.Random(5)
    defects = 0
    for page in range(300):
        times = sorted(rng.sample(range(FROM - 3 * STEP, TO + 3 * STEP, STEP),
                                  rng.randrange(0, 60)))
        bars = [defective(rng, t) for t in times]
        good, bad, payload = judged(bars)
        want_good, want_bad, want_payload = reference(bars)
        assert good == want_good, page
        assert [(q.t, q.reason) for q in bad] == want_bad, page
        assert payload == want_payload, page
        defects += len(bad)
    assert defects > 300  # every kind came up, many times


def test_a_page_out_of_order_takes_the_two_pass_path_and_quarantines_each_repeat() -> None:
    bars = [Bar(t=FROM + k * STEP, o=10.0, h=11.0, l=9.0, c=10.0, v=1.0) for k in (0, 1, 1, 3)]
    good, bad, _ = judged(bars)
    assert [b.t for b in good] == [FROM, FROM + 3 * STEP]
    assert [q.reason for q in bad] == ["timestamp repeated within one response"] * 2
    descending = [bars[3], bars[0]]
    good, bad, payload = judged(descending)
    assert good == descending and bad == [] and payload == reference(descending)[2]


def test_decode_page_judges_what_it_decodes() -> None:
    bars = [Bar(t=FROM + k * STEP, o=10.0, h=11.0, l=9.0, c=10.0, v=1.0, vw=10.0, n=k)
            for k in range(5)]
    bars[2] = msgspec.structs.replace(bars[2], h=8.0)
    body = msgspec.json.encode({"status": "OK", "results": bars})
    page = decode_page(body, FROM, TO, symbol="SPY", timeframe="5m")
    good, bad, payload = judged(bars)
    assert page.bars == good and list(page.quarantined) == bad
    assert page.rows is not None and bytes(page.rows.payload) == payload
    assert [q.reason for q in bad] == ["high 8.0 < low 9.0"]
