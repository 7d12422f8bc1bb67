-- Timestamps that parse but are odd: fractional seconds (rounded when typed), before 1970,
-- or after $now (the ingestion time). One row per kind: count and the first (file, line).
-- $ts_format: 'seconds' or 'date' (Netflix: whole days, never fractional).
WITH typed AS (
    SELECT src, line_no,
           CASE WHEN $ts_format = 'date' THEN NULL ELSE TRY_CAST(t AS DOUBLE) END AS seconds,
           CASE WHEN $ts_format = 'date'
                THEN CAST(epoch(CAST(TRY_STRPTIME(t, '%Y-%m-%d') AS TIMESTAMP)) AS BIGINT)
                ELSE TRY_CAST(t AS BIGINT)
           END AS ts
    FROM raw_text
), flagged AS (
    SELECT src, line_no,
           coalesce(seconds <> floor(seconds), false) AS fractional,
           coalesce(ts < 0, false) AS negative,
           coalesce(ts > $now, false) AS future
    FROM typed
)
SELECT 'fractional_timestamps' AS kind, count(*) FILTER (WHERE fractional),
       first(src ORDER BY src, line_no) FILTER (WHERE fractional), first(line_no ORDER BY src, line_no) FILTER (WHERE fractional)
FROM flagged
UNION ALL
SELECT 'negative_timestamps', count(*) FILTER (WHERE negative),
       first(src ORDER BY src, line_no) FILTER (WHERE negative), first(line_no ORDER BY src, line_no) FILTER (WHERE negative)
FROM flagged
UNION ALL
SELECT 'future_timestamps', count(*) FILTER (WHERE future),
       first(src ORDER BY src, line_no) FILTER (WHERE future), first(line_no ORDER BY src, line_no) FILTER (WHERE future)
FROM flagged;
