-- Keep a seeded sample of $n users: the first $n by a seeded md5 of the raw id (thread-count independent).
DELETE FROM ratings
WHERE raw_user NOT IN (
    SELECT raw_user
    FROM (SELECT DISTINCT raw_user FROM ratings)
    ORDER BY md5(CAST($seed AS VARCHAR) || ':' || CAST(raw_user AS VARCHAR)), raw_user
    LIMIT $n
);
