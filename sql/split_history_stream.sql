-- History and stream (docs/method.md §2.2-3): the positives of the remaining users, ordered by
-- (ts, user_id, item_id), cut at row round($history_fraction * n); the stream is cut into
-- $batches time-ordered batches of equal row counts (they differ by at most one row).
CREATE TABLE remaining AS
WITH ordered AS (
    SELECT user_id, item_id, ts,
           row_number() OVER (ORDER BY ts, user_id, item_id) - 1 AS rn,
           count(*) OVER () AS n
    FROM positives
    WHERE user_id NOT IN (SELECT user_id FROM new_user_ids)
), cut AS (
    SELECT *, CAST(round($history_fraction * n) AS BIGINT) AS n_history FROM ordered
)
SELECT user_id, item_id, ts, rn < n_history AS in_history,
       CAST(CASE WHEN rn < n_history THEN -1 ELSE ((rn - n_history) * $batches) // (n - n_history) END AS BIGINT) AS batch
FROM cut;
