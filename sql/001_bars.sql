-- Bars: one row per (symbol, timeframe, bar start). The primary key makes every write an
-- idempotent upsert; `symbol` leads every key so the table can be distributed on it (Citus).
-- Range-partitioned by year on ts: old years stay untouched and can be detached or archived.
CREATE TABLE bars (
    symbol    text             NOT NULL,
    timeframe text             NOT NULL,
    ts        timestamptz      NOT NULL,  -- bar start, UTC
    open      double precision NOT NULL,
    high      double precision NOT NULL,
    low       double precision NOT NULL,
    close     double precision NOT NULL,
    volume    double precision NOT NULL,
    vwap      double precision,           -- null when the API sent none
    trades    bigint,                     -- null when the API sent none
    CONSTRAINT bars_pkey PRIMARY KEY (symbol, timeframe, ts)
) PARTITION BY RANGE (ts);

-- Creates the partition holding year `y` unless it exists. Safe to race: several writers (or
-- several daemons sharing one database) may call it for the same year at once.
CREATE FUNCTION bars_ensure_partition(y integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    part text := format('bars_y%s', y);
BEGIN
    IF to_regclass(part) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF bars FOR VALUES FROM (%L) TO (%L)',
            part,
            make_timestamptz(y, 1, 1, 0, 0, 0, 'UTC'),
            make_timestamptz(y + 1, 1, 1, 0, 0, 0, 'UTC'));
    END IF;
EXCEPTION WHEN duplicate_table THEN
    NULL;  -- another session created it first
END $$;
