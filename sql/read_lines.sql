-- Every line of the rating file(s) as one text column, in file order.
-- Insertion order is preserved, so rowid later numbers the lines of each file.
-- chr(1) never occurs in these formats, so each line stays whole; parsing happens in SQL after.
CREATE TABLE lines AS
SELECT filename AS src, line AS text
FROM read_csv(
    $paths,
    columns = {'line': 'VARCHAR'}, delim = chr(1), quote = '', escape = '',
    header = false, auto_detect = false, filename = true
);
