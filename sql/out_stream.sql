-- stream.parquet: the last part (online), with its time-ordered batch; pos counts within the stream, same-second
-- rows in the tie-break order (positives.sql); sorted by (ts, user_id, pos).
SELECT user_id, item_id, ts,
       row_number() OVER (PARTITION BY user_id ORDER BY ts, tie, seq) - 1 AS pos,
       batch
FROM remaining
WHERE NOT in_history
ORDER BY ts, user_id, pos;
