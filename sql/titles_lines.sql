-- Titles from a '$delim'-separated file whose first two fields are id and title
-- (MovieLens u.item 'id|title|...', movies.dat 'id::title::genres'; both latin-1).
INSERT INTO titles
SELECT TRY_CAST(split_part(line, $delim, 1) AS BIGINT) AS raw_item, split_part(line, $delim, 2) AS title
FROM read_csv(
    $path,
    columns = {'line': 'VARCHAR'}, delim = chr(1), quote = '', escape = '',
    header = false, auto_detect = false, encoding = $encoding
)
WHERE TRY_CAST(split_part(line, $delim, 1) AS BIGINT) IS NOT NULL;
