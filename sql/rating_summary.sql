-- Count and range of the ratings as read, and how many are positives (>= $threshold).
SELECT count(*) AS n, min(CAST(r AS DOUBLE)) AS lo, max(CAST(r AS DOUBLE)) AS hi,
       count(*) FILTER (WHERE CAST(r AS DOUBLE) >= $threshold) AS positives
FROM raw_text;
