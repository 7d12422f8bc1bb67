-- The columns of a generic Parquet file (no rows).
SELECT * FROM read_parquet($path) LIMIT 0;
