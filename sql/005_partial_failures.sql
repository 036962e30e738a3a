-- Partial failures stay partial: quarantined bars, refused entitlements, their counts.

-- A bar the API sent that did not decode or validate. It is not in `bars`; its span (its
-- [t, t+1), or the whole page's span when its place is unknown) is kept out of the series'
-- coverage, so every top-up asks for it again. An answer that validates writes the bar and
-- deletes the entry, in the page's transaction.
CREATE TABLE quarantined_bars (
    symbol     text        NOT NULL,
    timeframe  text        NOT NULL,
    span       int8range   NOT NULL,            -- Unix ms, half-open
    t          bigint,                          -- the bar's t, when it had a usable one
    raw        text        NOT NULL,            -- the bar's JSON as received
    reason     text        NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now(),
    times_seen integer     NOT NULL DEFAULT 1,
    CONSTRAINT quarantined_bars_pkey PRIMARY KEY (symbol, timeframe, span)
);

-- A series the plan does not cover (403 "not entitled"): asked again at most once a day.
ALTER TABLE series_freshness
    ADD COLUMN refused_at     timestamptz,
    ADD COLUMN refused_reason text;

ALTER TABLE job_results ADD COLUMN quarantined integer NOT NULL DEFAULT 0;
ALTER TABLE executions
    ADD COLUMN jobs_not_entitled integer NOT NULL DEFAULT 0,
    ADD COLUMN bars_quarantined  bigint  NOT NULL DEFAULT 0;
