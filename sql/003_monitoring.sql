-- Monitoring: what the daemon did, written by the writer in the same transactions as the data
-- they describe, so they can never disagree with `bars` and `checkpoints`.

-- One row per scheduler cycle. Inserted when the cycle starts (status 'running'); the counters
-- grow as its jobs finish (each in its job's own transaction); the totals are set when it ends.
-- A cycle whose process died is marked 'interrupted' when its instance starts again.
CREATE TABLE executions (
    id               uuid             PRIMARY KEY,
    instance         text             NOT NULL,  -- [daemon] instance: which daemon ran it
    number           integer          NOT NULL,  -- the cycle's number in that process's life
    trigger          text             NOT NULL,  -- start / schedule / wake
    status           text             NOT NULL DEFAULT 'running',  -- running/ok/failed/interrupted
    started_at       timestamptz      NOT NULL,
    finished_at      timestamptz,
    duration_seconds double precision,
    jobs_total       integer          NOT NULL DEFAULT 0,
    jobs_ok          integer          NOT NULL DEFAULT 0,
    jobs_failed      integer          NOT NULL DEFAULT 0,
    jobs_cancelled   integer          NOT NULL DEFAULT 0,
    bars_written     bigint           NOT NULL DEFAULT 0,
    requests         integer          NOT NULL DEFAULT 0,  -- HTTP attempts sent in the cycle
    rate_limited     integer          NOT NULL DEFAULT 0,  -- 429s received in the cycle
    retries          integer          NOT NULL DEFAULT 0,
    error            text                                  -- why the cycle as a whole failed
);
CREATE INDEX executions_started_at ON executions (started_at DESC);

-- One row per (symbol, timeframe) per execution, written with the job's last message.
-- `symbol` leads the key (the Citus distribution column).
CREATE TABLE job_results (
    symbol       text             NOT NULL,
    timeframe    text             NOT NULL,
    execution_id uuid             NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    status       text             NOT NULL,  -- ok / failed / cancelled
    from_ts      timestamptz      NOT NULL,  -- the range the job asked for
    to_ts        timestamptz      NOT NULL,
    bars         bigint           NOT NULL,  -- bars committed
    pages        integer          NOT NULL,  -- pages fetched
    attempts     integer          NOT NULL,  -- HTTP attempts, retries included
    api_seconds  double precision NOT NULL,
    db_seconds   double precision NOT NULL,
    error        text,
    finished_at  timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT job_results_pkey PRIMARY KEY (symbol, timeframe, execution_id)
);
CREATE INDEX job_results_execution ON job_results (execution_id);

-- Per series: the newest bar committed and when it was last fetched, successfully or not.
-- last_bar_ts moves with each page's bars (same transaction); the rest with each job's end.
CREATE TABLE series_freshness (
    symbol          text        NOT NULL,
    timeframe       text        NOT NULL,
    last_bar_ts     timestamptz,           -- start of the newest bar in `bars`; null: none yet
    last_success_at timestamptz,           -- when a job for the series last finished ok
    checked_through timestamptz,           -- that job saw every bar up to here: the lesser of
                                           -- its end and its range's `to` (trailing bars with
                                           -- no trades are not missing before this instant)
    last_attempt_at timestamptz,           -- when a job last wrote a page or finished
    last_error      text,                  -- the last failure, kept after later successes
    last_error_at   timestamptz,
    CONSTRAINT series_freshness_pkey PRIMARY KEY (symbol, timeframe)
);

-- Series backfilled before this migration: their newest committed bar is the checkpoint's end.
INSERT INTO series_freshness (symbol, timeframe, last_bar_ts, last_attempt_at)
SELECT symbol, timeframe, covered_through, updated_at FROM checkpoints;
