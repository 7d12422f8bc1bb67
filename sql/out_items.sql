-- items.parquet: item_id, raw_item, title (null where the data set has none).
SELECT item_id, raw_item, title FROM item_map ORDER BY item_id;
