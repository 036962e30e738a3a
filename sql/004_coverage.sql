-- Coverage: per series, the SET of instants whose bars are all committed, as half-open Unix-ms
-- intervals. The writer adds each page's span (`covered + range`) in the page's own
-- transaction, so a crash at any instant leaves coverage exactly matching `bars`; what to fetch
-- is always `requested - covered` (holes, a moved history start, parallel sub-ranges, a resume
-- after kill -9 mid-range). It replaces `checkpoints`, which could hold one contiguous span only.
CREATE TABLE coverage (
    symbol     text           NOT NULL,
    timeframe  text           NOT NULL,
    covered    int8multirange NOT NULL DEFAULT '{}',
    updated_at timestamptz    NOT NULL DEFAULT now(),
    CONSTRAINT coverage_pkey PRIMARY KEY (symbol, timeframe)
);

-- A checkpoint [covered_from, covered_through] (through = the last bar's start) covers
-- [from, through + 1 ms).
INSERT INTO coverage (symbol, timeframe, covered, updated_at)
SELECT symbol, timeframe,
       int8multirange(int8range(
           (extract(epoch FROM covered_from) * 1000)::bigint,
           (extract(epoch FROM covered_through) * 1000)::bigint + 1)),
       updated_at
FROM checkpoints;

DROP TABLE checkpoints;
