-- ML-1M movies.dat 'MovieID::Title (Year)::Genre|Genre' -> genre (multi-valued) and year (from the title).
INSERT INTO raw_features
WITH parts AS (
    SELECT string_split(text, '::') AS f FROM feature_lines WHERE text IS NOT NULL AND trim(text) <> ''
)
SELECT 'item', CAST(trim(f[1]) AS BIGINT), 'genre', trim(unnest(string_split(f[3], '|')))
FROM parts
UNION ALL
SELECT 'item', CAST(trim(f[1]) AS BIGINT), 'year', regexp_extract(trim(f[2]), '\(([0-9]{4})\)$', 1)
FROM parts;
