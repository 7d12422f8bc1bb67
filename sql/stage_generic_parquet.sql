-- A generic Parquet file: the four configured columns, as text (checked and typed like a CSV's).
CREATE TABLE staged AS
SELECT $path AS src,
       CAST(COLUMNS(lambda c: c = $user_col) AS VARCHAR) AS u,
       CAST(COLUMNS(lambda c: c = $item_col) AS VARCHAR) AS i,
       CAST(COLUMNS(lambda c: c = $rating_col) AS VARCHAR) AS r,
       CAST(COLUMNS(lambda c: c = $ts_col) AS VARCHAR) AS t
FROM read_parquet($path);
