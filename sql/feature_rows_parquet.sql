-- A feature table in Parquet: the id column (named $id_col) as raw_id, every other column as text.
CREATE OR REPLACE TABLE feature_rows AS
SELECT CAST(COLUMNS(lambda c: c = $id_col) AS VARCHAR) AS raw_id, CAST(COLUMNS(lambda c: c <> $id_col) AS VARCHAR)
FROM read_parquet($path);
