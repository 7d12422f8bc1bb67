-- New users and the most positives any one of them has (to explain an empty evaluation).
SELECT count(*) AS new_users, max(n) AS most
FROM (SELECT user_id, count(*) AS n FROM read_parquet($new_users) GROUP BY user_id);
