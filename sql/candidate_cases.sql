-- Evaluation cases (docs/method.md §9): for each new user with >= $min_positives positives and each
-- n in $ns, the positive at pos = n (the user has shown pos 0..n-1 first); and every stream row.
-- Cases are numbered by (ts, user_id, pos): pos already holds the tie-break of same-second rows, never the item id.
WITH nu AS (
    SELECT * FROM read_parquet($new_users)
), eligible AS (
    SELECT user_id FROM nu GROUP BY user_id HAVING count(*) >= $min_positives
), ns AS (
    SELECT CAST(unnest($ns) AS BIGINT) AS n
), cases AS (
    SELECT 0 AS kind_order, 'new' AS kind, ns.n, CAST(-1 AS BIGINT) AS batch, nu.user_id, nu.item_id, nu.pos, nu.ts
    FROM nu JOIN ns ON nu.pos = ns.n
    WHERE nu.user_id IN (SELECT user_id FROM eligible)
    UNION ALL
    SELECT 1, 'stream', CAST(-1 AS BIGINT), batch, user_id, item_id, pos, ts
    FROM read_parquet($stream)
)
SELECT row_number() OVER (ORDER BY kind_order, n, batch, ts, user_id, pos) - 1 AS case_id,
       kind, n, batch, user_id, item_id, pos
FROM cases
ORDER BY case_id;
