-- The first line (by file, line) whose rating is off the format's scale: below $low, above $high,
-- or not a whole number of $step (MovieLens 1-5 stars; MovieLens latest 0.5-5 in half stars).
SELECT src, line_no
FROM raw_text
WHERE CAST(r AS DOUBLE) < $low
   OR CAST(r AS DOUBLE) > $high
   OR CAST(r AS DOUBLE) / $step <> round(CAST(r AS DOUBLE) / $step)
ORDER BY src, line_no
LIMIT 1;
