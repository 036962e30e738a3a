-- Splits the API listed (daemon.splits). A split first seen after the first check, for a
-- configured ticker, is applied in one transaction: the bars before its execution date are
-- rescaled and their span leaves the series' coverage, so that history is fetched again.
-- Small and keyed by the split's id: a Citus reference table when distributed.
CREATE TABLE splits (
    id             text             PRIMARY KEY,
    ticker         text             NOT NULL,
    execution_date date             NOT NULL,
    split_from     double precision NOT NULL,
    split_to       double precision NOT NULL,
    first_seen_at  timestamptz      NOT NULL DEFAULT now(),
    applied_at     timestamptz,                -- NULL: known before the data (nothing to do)
    bars_rescaled  bigint
);
CREATE INDEX splits_ticker ON splits (ticker, execution_date);

-- Up to which execution date the splits are known, and when they were last asked for.
CREATE TABLE splits_checked (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    checked_at timestamptz NOT NULL,
    through    date        NOT NULL
);
