-- history.parquet: the first part of the remaining positives (offline training).
SELECT user_id, item_id, ts,
       row_number() OVER (PARTITION BY user_id ORDER BY ts, item_id) - 1 AS pos
FROM remaining
WHERE in_history
ORDER BY ts, user_id, item_id;
