-- A generic CSV with a header: the four configured columns, as text, in file order ($path: the literal pattern, $src: the name in messages).
CREATE TABLE staged AS
SELECT $src AS src,
       COLUMNS(lambda c: c = $user_col) AS u,
       COLUMNS(lambda c: c = $item_col) AS i,
       COLUMNS(lambda c: c = $rating_col) AS r,
       COLUMNS(lambda c: c = $ts_col) AS t
FROM read_csv($path, header = true, all_varchar = true);
