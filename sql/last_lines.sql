-- The number of the last rating line of each file (to name a possibly truncated one).
SELECT src, max(line_no) FROM raw_text GROUP BY src;
