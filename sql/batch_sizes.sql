-- Rows per stream batch, in batch order.
SELECT batch, count(*) AS rows, min(ts) AS ts_min, max(ts) AS ts_max
FROM read_parquet($stream) GROUP BY batch ORDER BY batch;
