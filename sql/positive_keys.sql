-- Every (user, item) that is a positive anywhere in the data set, as one sorted key user * $n_items + item.
SELECT DISTINCT user_id * $n_items + item_id AS key
FROM read_parquet($paths)
ORDER BY key;
