-- Dense item ids 0..I-1 over every rating, in raw id order, with the title where the data set has one.
CREATE TABLE item_map AS
SELECT CAST(row_number() OVER (ORDER BY i.raw_item) - 1 AS BIGINT) AS item_id, i.raw_item, t.title
FROM (SELECT DISTINCT raw_item FROM ratings) AS i
LEFT JOIN (SELECT raw_item, min(title) AS title FROM titles GROUP BY raw_item) AS t USING (raw_item);
