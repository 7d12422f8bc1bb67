-- Positives: ratings >= $threshold; a repeated (user, item) keeps its earliest time (docs/method.md §1).
CREATE TABLE positives AS
SELECT user_id, item_id, min(ts) AS ts
FROM read_parquet($interactions)
WHERE rating >= $threshold
GROUP BY user_id, item_id;
