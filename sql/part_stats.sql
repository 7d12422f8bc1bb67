-- Rows, users, items and time range of one prepared Parquet file.
SELECT count(*) AS rows, count(DISTINCT user_id) AS users, count(DISTINCT item_id) AS items,
       min(ts) AS ts_min, max(ts) AS ts_max
FROM read_parquet($path);
