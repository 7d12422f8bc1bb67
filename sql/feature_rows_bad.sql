-- The first row of feature_rows whose id is not an integer or repeats an earlier row's id.
-- $first_line: the file line (or Parquet row) of the first data row.
WITH numbered AS (
    SELECT rowid + $first_line AS line_no, raw_id FROM feature_rows
), firsts AS (
    SELECT line_no, raw_id, min(line_no) OVER (PARTITION BY raw_id) AS first_line FROM numbered
)
SELECT line_no, raw_id,
       CASE WHEN TRY_CAST(trim(raw_id) AS BIGINT) IS NULL THEN 'integer' ELSE 'duplicate' END AS problem,
       first_line
FROM firsts
WHERE TRY_CAST(trim(raw_id) AS BIGINT) IS NULL OR line_no > first_line
ORDER BY line_no
LIMIT 1;
