-- The first line (by file, line) that is not a valid rating, and what is wrong with it.
-- $ts_format: 'seconds' (integer unix time) or 'date' (YYYY-MM-DD, Netflix).
SELECT src, line_no, text, nfields, u, i, r, t, problem
FROM (
    SELECT *,
        CASE
            WHEN nfields = -1 THEN 'movie'
            WHEN nfields <> $nfields THEN 'fields'
            WHEN TRY_CAST(u AS BIGINT) IS NULL THEN 'user'
            WHEN TRY_CAST(i AS BIGINT) IS NULL THEN 'item'
            WHEN TRY_CAST(r AS DOUBLE) IS NULL OR NOT isfinite(TRY_CAST(r AS DOUBLE)) THEN 'rating'
            WHEN $ts_format = 'date' AND TRY_STRPTIME(t, '%Y-%m-%d') IS NULL THEN 'timestamp'
            WHEN $ts_format = 'seconds' AND TRY_CAST(t AS BIGINT) IS NULL THEN 'timestamp'
        END AS problem
    FROM raw_text
)
WHERE problem IS NOT NULL
ORDER BY src, line_no
LIMIT 1;
