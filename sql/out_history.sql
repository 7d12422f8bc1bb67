-- history.parquet: the first part of the remaining positives (offline training); pos in the tie-break order
-- (positives.sql), and the rows sorted by (ts, user_id, pos), so a user's same-second rows come in pos order.
SELECT user_id, item_id, ts,
       row_number() OVER (PARTITION BY user_id ORDER BY ts, tie, seq) - 1 AS pos
FROM remaining
WHERE in_history
ORDER BY ts, user_id, pos;
