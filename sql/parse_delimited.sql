-- Split each rating line on $delim into text fields (user, item, rating, timestamp).
-- Blank lines and the first $header_lines lines of each file are skipped; types are checked later.
CREATE TABLE raw_text AS
WITH firsts AS (
    SELECT src, min(rowid) AS r0 FROM lines GROUP BY src
), numbered AS (
    SELECT l.src, l.rowid - f.r0 + 1 AS line_no, rtrim(l.text, chr(13)) AS text
    FROM lines AS l JOIN firsts AS f USING (src)
), parts AS (
    SELECT src, line_no, text, string_split(text, $delim) AS f
    FROM numbered
    WHERE line_no > $header_lines AND text IS NOT NULL AND trim(text) <> ''
)
SELECT src, line_no, text, len(f) AS nfields,
       trim(f[1]) AS u, trim(f[2]) AS i, trim(f[3]) AS r, trim(f[4]) AS t
FROM parts;
