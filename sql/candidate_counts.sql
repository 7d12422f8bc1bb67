-- Evaluation cases per kind and n, and distinct users among them.
SELECT kind, n, count(*) AS cases, count(DISTINCT user_id) AS users
FROM read_parquet($candidates) GROUP BY kind, n ORDER BY kind, n;
