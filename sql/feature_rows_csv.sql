-- A feature table in a CSV with a header: the id column (named $id_col) as raw_id, every other column as text.
CREATE OR REPLACE TABLE feature_rows AS
SELECT CAST(COLUMNS(lambda c: c = $id_col) AS VARCHAR) AS raw_id, COLUMNS(lambda c: c <> $id_col)
FROM read_csv($path, header = true, all_varchar = true);
