-- new_users.parquet: every positive of the new users, pos = chronological position per user.
SELECT user_id, item_id, ts,
       row_number() OVER (PARTITION BY user_id ORDER BY ts, item_id) - 1 AS pos
FROM positives
WHERE user_id IN (SELECT user_id FROM new_user_ids)
ORDER BY ts, user_id, item_id;
