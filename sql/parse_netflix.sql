-- Netflix Prize files: a 'MovieID:' line opens a block of 'CustomerID,Rating,YYYY-MM-DD' lines.
-- Each rating line takes the movie of the last header above it in the same file (an ASOF join,
-- so 100M lines are matched without a window over all of them). nfields = -1 marks a rating
-- line with no header above it.
CREATE TABLE raw_text AS
WITH firsts AS (
    SELECT src, min(rowid) AS r0 FROM lines GROUP BY src
), numbered AS (
    SELECT l.src, l.rowid - f.r0 + 1 AS line_no, trim(rtrim(l.text, chr(13))) AS text
    FROM lines AS l JOIN firsts AS f USING (src)
    WHERE l.text IS NOT NULL AND trim(l.text) <> ''
), headers AS (
    SELECT src, line_no, rtrim(text, ':') AS movie
    FROM numbered WHERE regexp_full_match(text, '[0-9]+:')
), ratings AS (
    SELECT src, line_no, text, string_split(text, ',') AS f
    FROM numbered WHERE NOT regexp_full_match(text, '[0-9]+:')
)
SELECT r.src, r.line_no, r.text,
       CASE WHEN h.movie IS NULL THEN -1 ELSE len(r.f) END AS nfields,
       trim(r.f[1]) AS u, h.movie AS i, trim(r.f[2]) AS r, trim(r.f[3]) AS t
FROM ratings AS r ASOF LEFT JOIN headers AS h ON r.src = h.src AND r.line_no >= h.line_no;
