-- History and stream (docs/method.md §2.2-3): the positives of the remaining users, ordered by
-- (ts, user_id, tie, seq) (tie: positives.sql), cut at row round($history_fraction * n); the stream is
-- cut into $batches time-ordered batches of equal row counts (they differ by at most one row).
-- Ties at the cut: rows of the cut's second go to the history in that order until the count is reached,
-- so a user's same-second rows are split by the tie-break order (the earlier ones to the history), never
-- by item label under data.tie_break = 'random'.
CREATE TABLE remaining AS
WITH ordered AS (
    SELECT user_id, item_id, ts, seq, tie,
           row_number() OVER (ORDER BY ts, user_id, tie, seq) - 1 AS rn,
           count(*) OVER () AS n
    FROM positives
    WHERE user_id NOT IN (SELECT user_id FROM new_user_ids)
), cut AS (
    SELECT *, CAST(round($history_fraction * n) AS BIGINT) AS n_history FROM ordered
)
SELECT user_id, item_id, ts, seq, tie, rn < n_history AS in_history,
       CAST(CASE WHEN rn < n_history THEN -1 ELSE ((rn - n_history) * $batches) // (n - n_history) END AS BIGINT) AS batch
FROM cut;
