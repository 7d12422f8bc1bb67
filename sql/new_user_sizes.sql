-- New users with at least $min_positives positives (the ones evaluated for every n).
SELECT count(*) FROM (
    SELECT user_id FROM read_parquet($new_users) GROUP BY user_id HAVING count(*) >= $min_positives
);
