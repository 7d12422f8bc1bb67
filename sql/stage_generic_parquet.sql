-- A generic Parquet file: the four configured columns, as text, checked and typed like a CSV's ($src names it in messages).
CREATE TABLE staged AS
SELECT $src AS src,
       CAST(COLUMNS(lambda c: c = $user_col) AS VARCHAR) AS u,
       CAST(COLUMNS(lambda c: c = $item_col) AS VARCHAR) AS i,
       CAST(COLUMNS(lambda c: c = $rating_col) AS VARCHAR) AS r,
       CAST(COLUMNS(lambda c: c = $ts_col) AS VARCHAR) AS t
FROM read_parquet($path);
