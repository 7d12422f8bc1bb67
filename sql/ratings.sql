-- Typed ratings from the checked text fields; ts in integer seconds (a Netflix date is its midnight UTC).
CREATE TABLE ratings AS
SELECT CAST(u AS BIGINT) AS raw_user,
       CAST(i AS BIGINT) AS raw_item,
       CAST(r AS DOUBLE) AS rating,
       CASE WHEN $ts_format = 'date'
            THEN CAST(epoch(CAST(TRY_STRPTIME(t, '%Y-%m-%d') AS TIMESTAMP)) AS BIGINT)
            ELSE TRY_CAST(t AS BIGINT)
       END AS ts
FROM raw_text;
