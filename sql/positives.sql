-- Positives: ratings >= $threshold; a repeated (user, item) keeps its earliest time (docs/method.md §1), and of
-- copies at that time the first in the input.
-- tie orders a user's positives of the same second (data.tie_break): 'random' = a seeded hash of the row's
-- input position ($seed), independent of the item's label; 'item_id' = the dense item id (ascending; the old order).
-- Every later order of positives is (ts, tie, seq) within a user; seq makes it total.
CREATE TABLE positives AS
SELECT user_id, item_id, ts, seq,
       CASE WHEN $tie_break = 'item_id' THEN CAST(item_id AS UBIGINT)
            ELSE md5_number_lower(CAST($seed AS VARCHAR) || ':' || CAST(seq AS VARCHAR))
       END AS tie
FROM read_parquet($interactions)
WHERE rating >= $threshold
QUALIFY row_number() OVER (PARTITION BY user_id, item_id ORDER BY ts, seq) = 1;
