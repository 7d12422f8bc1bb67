-- Typed ratings from the checked text fields; ts in integer seconds (a Netflix date is its midnight UTC).
-- seq: the line's position in the input (files in name order, then line order). It names the row without
-- its item, so the seeded tie-break of same-second positives (positives.sql) cannot favour any item label.
CREATE TABLE ratings AS
SELECT CAST(u AS BIGINT) AS raw_user,
       CAST(i AS BIGINT) AS raw_item,
       CAST(r AS DOUBLE) AS rating,
       CASE WHEN $ts_format = 'date'
            THEN CAST(epoch(CAST(TRY_STRPTIME(t, '%Y-%m-%d') AS TIMESTAMP)) AS BIGINT)
            ELSE TRY_CAST(t AS BIGINT)
       END AS ts,
       CAST(row_number() OVER (ORDER BY src, line_no) - 1 AS BIGINT) AS seq
FROM raw_text;
