-- interactions.parquet: every rating with dense ids and its input position seq, sorted by (ts, user_id, item_id, rating, seq).
SELECT u.user_id, i.item_id, r.rating, r.ts, r.seq
FROM ratings AS r
JOIN user_map AS u USING (raw_user)
JOIN item_map AS i USING (raw_item)
ORDER BY r.ts, u.user_id, i.item_id, r.rating, r.seq;
