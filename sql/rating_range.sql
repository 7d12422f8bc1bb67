-- Count and range of the ratings in interactions.parquet (for messages and stats).
SELECT count(*) AS n, min(rating) AS lo, max(rating) AS hi FROM read_parquet($interactions);
