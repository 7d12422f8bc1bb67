-- ML-1M users.dat 'UserID::Gender::Age::Occupation::Zip-code' -> four user fields (age is already a group
-- code, occupation a code 0-20); zip codes cut to their first $zip_digits characters (a region).
INSERT INTO raw_features
SELECT 'user' AS kind,
       CAST(trim(f[1]) AS BIGINT) AS raw_id,
       unnest(['gender', 'age', 'occupation', 'zip']) AS field,
       unnest([trim(f[2]), CAST(CAST(trim(f[3]) AS BIGINT) AS VARCHAR), CAST(CAST(trim(f[4]) AS BIGINT) AS VARCHAR),
               left(trim(f[5]), $zip_digits)]) AS value
FROM (SELECT string_split(text, '::') AS f FROM feature_lines WHERE text IS NOT NULL AND trim(text) <> '');
