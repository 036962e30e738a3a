-- Checkpoints: per series, the contiguous span [covered_from, covered_through] whose bars are
-- all committed. The writer moves it forward in the same transaction as each page's bars, so a
-- crash at any instant resumes from the last committed page: no gap, no duplicate.
CREATE TABLE checkpoints (
    symbol          text        NOT NULL,
    timeframe       text        NOT NULL,
    covered_from    timestamptz NOT NULL,  -- first instant of the span (a job's `from`)
    covered_through timestamptz NOT NULL,  -- start of the last bar committed in the span
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT checkpoints_pkey PRIMARY KEY (symbol, timeframe),
    CONSTRAINT checkpoints_span CHECK (covered_from <= covered_through)
);
