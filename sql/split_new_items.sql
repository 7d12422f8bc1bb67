-- New items (item cold start, Table 2; the mirror of split_new_users.sql): the items with a positive in the
-- history, ranked by a seeded md5 of their id (the sample depends on the seed only), are dealt round-robin
-- into $deals groups; group $fold is this split's new items. Their rows leave the training history
-- (new_item_train.sql) and are numbered per item in time order (new_item_rows.sql).
CREATE TABLE new_item_ids AS
WITH items AS (
    SELECT DISTINCT item_id FROM read_parquet($history)
), ranked AS (
    SELECT item_id,
           row_number() OVER (ORDER BY md5(CAST($seed AS VARCHAR) || ':item:' || CAST(item_id AS VARCHAR)), item_id) - 1 AS rank
    FROM items
)
SELECT item_id FROM ranked WHERE rank % $deals = $fold;
