-- ml-100k u.item 'movie id|title|release date|video release date|IMDb URL|19 genre flags' -> genre
-- (one value per flag set, named as in u.genre) and year (of the release date 'dd-Mon-yyyy').
INSERT INTO raw_features
WITH parts AS (
    SELECT string_split(text, '|') AS f FROM feature_lines WHERE text IS NOT NULL AND trim(text) <> ''
), genres AS (
    SELECT CAST(trim(f[1]) AS BIGINT) AS raw_id, unnest(list_filter(range(6, 25), lambda p: trim(f[p]) = '1')) AS flag
    FROM parts
)
SELECT 'item', raw_id, 'genre',
       ['unknown', 'Action', 'Adventure', 'Animation', 'Children''s', 'Comedy', 'Crime', 'Documentary', 'Drama',
        'Fantasy', 'Film-Noir', 'Horror', 'Musical', 'Mystery', 'Romance', 'Sci-Fi', 'Thriller', 'War', 'Western'][flag - 5]
FROM genres
UNION ALL
SELECT 'item', CAST(trim(f[1]) AS BIGINT), 'year', regexp_extract(trim(f[3]), '([0-9]{4})$', 1)
FROM parts;
