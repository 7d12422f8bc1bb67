-- users.parquet: user_id, raw_user.
SELECT user_id, raw_user FROM user_map ORDER BY user_id;
