-- New users (METHOD.md §2.1): round($fraction * U) of the U users with a positive, taken in
-- the order of a seeded md5 of their id, so the sample depends on the seed only (not on threads).
CREATE TABLE new_user_ids AS
WITH users AS (
    SELECT DISTINCT user_id FROM positives
), ranked AS (
    SELECT user_id,
           row_number() OVER (ORDER BY md5(CAST($seed AS VARCHAR) || ':' || CAST(user_id AS VARCHAR)), user_id) AS rank,
           count(*) OVER () AS n_users
    FROM users
)
SELECT user_id FROM ranked WHERE rank <= round($fraction * n_users);
