-- Table 2's cases: each interaction of a new item from item_pos = $first (= max(n)) on, so the item has shown
-- max(n) rows before it and every n is asked the same cases. Numbered by (ts, user_id, item_id).
SELECT row_number() OVER (ORDER BY ts, user_id, item_id) - 1 AS case_id, user_id, item_id, item_pos, ts
FROM read_parquet($rows)
WHERE item_pos >= $first
ORDER BY case_id;
