-- Every history row of a new item, with item_pos: its 0-based place among that item's rows in time order
-- (same-second rows by user, then by the user's own tie-broken pos; never by item id). The first n of an
-- item are what a model is shown; the rest are cases (new_item_cases.sql).
SELECT user_id, item_id, ts,
       row_number() OVER (PARTITION BY item_id ORDER BY ts, user_id, pos) - 1 AS item_pos
FROM read_parquet($history)
WHERE item_id IN (SELECT item_id FROM new_item_ids)
ORDER BY item_id, item_pos;
