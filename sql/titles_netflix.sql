-- Titles from Netflix movie_titles.txt: 'MovieID,YearOfRelease,Title' where the title may hold commas.
INSERT INTO titles
SELECT CAST(regexp_extract(line, '^([0-9]+),', 1) AS BIGINT) AS raw_item,
       regexp_extract(line, '^[0-9]+,[^,]*,(.*)$', 1) AS title
FROM read_csv(
    $path,
    columns = {'line': 'VARCHAR'}, delim = chr(1), quote = '', escape = '',
    header = false, auto_detect = false, encoding = 'latin-1'
)
WHERE regexp_matches(line, '^[0-9]+,');
