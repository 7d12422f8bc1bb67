-- New users (docs/method.md §2.1): the U users with a positive, ranked by a seeded md5 of their id (so the
-- sample depends on the seed only, not on threads), are dealt round-robin into $deals groups of about
-- U / $deals users each (10 groups of 10% by default). Group $fold is this split's new users; with
-- new-user folds, fold f takes group f, so the folds are disjoint and, over all $deals folds, every user
-- is a new user exactly once.
CREATE TABLE new_user_ids AS
WITH users AS (
    SELECT DISTINCT user_id FROM positives
), ranked AS (
    SELECT user_id,
           row_number() OVER (ORDER BY md5(CAST($seed AS VARCHAR) || ':' || CAST(user_id AS VARCHAR)), user_id) - 1 AS rank
    FROM users
)
SELECT user_id FROM ranked WHERE rank % $deals = $fold;
