-- The history a Table 2 row is trained on: every history row except the new items' (split_new_items.sql),
-- in the history's own order (ts, user_id, pos).
SELECT user_id, item_id, ts, pos
FROM read_parquet($history)
WHERE item_id NOT IN (SELECT item_id FROM new_item_ids)
ORDER BY ts, user_id, pos;
