-- Features: derived quant columns per bar, computed in the database from `bars` by
-- daemon.features (set-based SQL, window functions), with their own staleness.

-- One row per bar, keyed like `bars`: `symbol` leads every key (the Citus distribution column,
-- so a series' features live on the same node as its bars), and the table is range-partitioned
-- by year on ts like `bars`, so a year of features is detached or archived with its bars.
-- NULL where a definition lacks its bars (see daemon/features.py for the exact definitions).
CREATE TABLE features (
    symbol        text             NOT NULL,
    timeframe     text             NOT NULL,
    ts            timestamptz      NOT NULL,  -- the bar's start, as in `bars`
    log_return    double precision,           -- ln(close / previous close)
    volatility_20 double precision,           -- sample stddev of the last 20 log returns
    sma_20        double precision,
    sma_50        double precision,
    ema_20        double precision NOT NULL,  -- alpha 2/21, seeded with the first close
    atr_14        double precision,
    rsi_14        double precision,
    volume_z_20   double precision,
    range_pos_20  double precision,
    regime        text,
    CONSTRAINT features_pkey PRIMARY KEY (symbol, timeframe, ts),
    CONSTRAINT features_regime CHECK (regime IN ('trend_up', 'trend_down', 'range'))
) PARTITION BY RANGE (ts);

-- Creates the partition holding year `y` unless it exists; safe to race, like
-- bars_ensure_partition.
CREATE FUNCTION features_ensure_partition(y integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    part text := format('features_y%s', y);
BEGIN
    IF to_regclass(part) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF features FOR VALUES FROM (%L) TO (%L)',
            part,
            make_timestamptz(y, 1, 1, 0, 0, 0, 'UTC'),
            make_timestamptz(y + 1, 1, 1, 0, 0, 0, 'UTC'));
    END IF;
EXCEPTION WHEN duplicate_table THEN
    NULL;  -- another session created it first
END $$;

-- The same years as the bars already there.
SELECT features_ensure_partition(substring(c.relname FROM '^bars_y(\d+)$')::integer)
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'bars'::regclass AND c.relname ~ '^bars_y\d+$';

-- Dirty markers: "the features of this series are stale from from_ts on". The writer sets one in
-- each page's transaction (daemon.features.mark_dirty: from_ts = LEAST(old, new), generation + 1),
-- so a committed page can never go unnoticed, even across a crash.
--
-- The features task claims a marker in a short transaction of its own (claimed_from takes
-- from_ts, from_ts becomes 'infinity': nothing new since the claim), computes, then deletes the
-- marker only if its generation did not change meanwhile; otherwise from_ts already holds what
-- the pages committed since the claim touched, and only that is recomputed next time. The claim
-- is durable: a crash mid-computation leaves claimed_from, and the next run computes from it.
-- No row lock is held longer than one of those short statements, so the writer never waits.
CREATE TABLE features_dirty (
    symbol       text        NOT NULL,
    timeframe    text        NOT NULL,
    from_ts      timestamptz NOT NULL,  -- stale from here on ('infinity': nothing since the claim)
    generation   bigint      NOT NULL,  -- + 1 per mark: a changed value means "touched again"
    updated_at   timestamptz NOT NULL,
    claimed_from timestamptz,           -- being computed from here (null: not claimed)
    CONSTRAINT features_dirty_pkey PRIMARY KEY (symbol, timeframe)
);

-- Per series, what has been computed: read by the staleness endpoint without touching
-- `features` (one small row per series, written in each computation's transaction).
CREATE TABLE features_progress (
    symbol           text        NOT NULL,
    timeframe        text        NOT NULL,
    computed_through timestamptz NOT NULL,  -- ts of the newest feature row
    computed_at      timestamptz NOT NULL,
    CONSTRAINT features_progress_pkey PRIMARY KEY (symbol, timeframe)
);

-- EMA as an aggregate, used as a running window function (frame from the partition start, so
-- PostgreSQL advances it one row at a time): ema = x on the first row, else
-- alpha * x + (1 - alpha) * previous ema. `seed` is the EMA of the bar just before the first
-- row, carried from the stored features so a recomputation can start mid-series; NULL starts
-- the series afresh.
CREATE FUNCTION features_ema_step(state double precision, x double precision,
                                  alpha double precision, seed double precision)
RETURNS double precision
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    -- plpgsql, not sql: an aggregate's transition function is never inlined, and PL/pgSQL's
    -- simple-expression path measured 2.5 x faster than a SQL function here (0.3 us a row).
    IF state IS NOT NULL THEN
        RETURN alpha * x + (1 - alpha) * state;
    ELSIF seed IS NOT NULL THEN
        RETURN alpha * x + (1 - alpha) * seed;
    END IF;
    RETURN x;
END $$;

CREATE AGGREGATE features_ema(x double precision, alpha double precision,
                              seed double precision) (
    SFUNC = features_ema_step,
    STYPE = double precision
);

-- Series that already have bars are marked stale from their first covered instant, so the task
-- computes them once; with no feature row before that instant it computes from scratch anyway.
INSERT INTO features_dirty (symbol, timeframe, from_ts, generation, updated_at)
SELECT symbol, timeframe, min(from_ts), 1, now()
FROM (SELECT symbol, timeframe,
             'epoch'::timestamptz + lower(covered) * interval '1 millisecond'
      FROM coverage WHERE NOT isempty(covered)
      UNION ALL
      SELECT symbol, timeframe, last_bar_ts FROM series_freshness WHERE last_bar_ts IS NOT NULL)
     AS known (symbol, timeframe, from_ts)
GROUP BY symbol, timeframe;
