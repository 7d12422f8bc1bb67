-- The header of a generic CSV (no rows): its column names, to check the configured ones exist.
SELECT * FROM read_csv($path, header = true, all_varchar = true) LIMIT 0;
