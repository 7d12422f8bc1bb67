-- new_users.parquet: every positive of the new users, pos = chronological position per user, same-second
-- rows in the tie-break order (positives.sql); sorted by (ts, user_id, pos).
SELECT user_id, item_id, ts,
       row_number() OVER (PARTITION BY user_id ORDER BY ts, tie, seq) - 1 AS pos
FROM positives
WHERE user_id IN (SELECT user_id FROM new_user_ids)
ORDER BY ts, user_id, pos;
