-- ml-100k u.user 'user id|age|gender|occupation|zip code' -> four user fields. Ages go into ML-1M's age
-- groups (1 = under 18, 18, 25, 35, 45, 50, 56 = 56+), so "age" means the same in both releases;
-- zip codes are cut to their first $zip_digits characters (a region).
INSERT INTO raw_features
SELECT 'user' AS kind,
       CAST(trim(f[1]) AS BIGINT) AS raw_id,
       unnest(['age', 'gender', 'occupation', 'zip']) AS field,
       unnest([
           CAST(CASE WHEN age < 18 THEN 1 WHEN age < 25 THEN 18 WHEN age < 35 THEN 25 WHEN age < 45 THEN 35
                     WHEN age < 50 THEN 45 WHEN age < 56 THEN 50 ELSE 56 END AS VARCHAR),
           trim(f[3]), trim(f[4]), left(trim(f[5]), $zip_digits)
       ]) AS value
FROM (
    SELECT f, CAST(trim(f[2]) AS BIGINT) AS age
    FROM (SELECT string_split(text, '|') AS f FROM feature_lines WHERE text IS NOT NULL AND trim(text) <> '')
);
