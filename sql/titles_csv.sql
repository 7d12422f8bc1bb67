-- Titles from MovieLens latest movies.csv (header movieId,title,genres; titles may be quoted).
INSERT INTO titles
SELECT TRY_CAST(movieId AS BIGINT) AS raw_item, title
FROM read_csv($path, header = true, all_varchar = true)
WHERE TRY_CAST(movieId AS BIGINT) IS NOT NULL;
