-- stream.parquet: the last part (online), with its time-ordered batch; pos counts within the stream.
SELECT user_id, item_id, ts,
       row_number() OVER (PARTITION BY user_id ORDER BY ts, item_id) - 1 AS pos,
       batch
FROM remaining
WHERE NOT in_history
ORDER BY ts, user_id, item_id;
