-- Dense user ids 0..U-1 over every rating, in raw id order.
CREATE TABLE user_map AS
SELECT CAST(row_number() OVER (ORDER BY raw_user) - 1 AS BIGINT) AS user_id, raw_user
FROM (SELECT DISTINCT raw_user FROM ratings);
