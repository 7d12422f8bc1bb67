-- MovieLens latest movies.csv (movieId,title,genres, staged in feature_rows with movieId as raw_id)
-- -> genre (multi-valued; '(no genres listed)' is none) and year (from the title).
INSERT INTO raw_features
SELECT 'item', CAST(trim(raw_id) AS BIGINT), 'genre', g
FROM (SELECT raw_id, trim(unnest(string_split(genres, '|'))) AS g FROM feature_rows)
WHERE g <> '(no genres listed)'
UNION ALL
SELECT 'item', CAST(trim(raw_id) AS BIGINT), 'year', regexp_extract(trim(title), '\(([0-9]{4})\)$', 1)
FROM feature_rows;
