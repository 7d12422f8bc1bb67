-- Every line of one delimited profile file (u.user, u.item, users.dat, movies.dat) as text, in file order
-- (rowid + 1 is the line number: blank lines are kept as NULL rows, so numbering never shifts).
CREATE OR REPLACE TABLE feature_lines AS
SELECT line AS text
FROM read_csv(
    $path,
    columns = {'line': 'VARCHAR'}, delim = chr(1), quote = '', escape = '',
    header = false, auto_detect = false, encoding = $encoding
);
