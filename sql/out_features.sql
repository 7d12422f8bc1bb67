-- user_features.parquet / item_features.parquet ($kind 'user' / 'item'): one row per (entity, value) with
-- dense ids, entity_id, field_id, field, value, code; code numbers the distinct (field, value) pairs in
-- (field, value) order and field_id the fields in name order. Entities absent from the ratings and empty
-- values are dropped. $users, $items: users.parquet and items.parquet (dense id, raw id).
WITH ids AS (
    SELECT 'user' AS kind, user_id AS entity_id, raw_user AS raw_id FROM read_parquet($users)
    UNION ALL
    SELECT 'item', item_id, raw_item FROM read_parquet($items)
), known AS (
    SELECT DISTINCT i.entity_id, r.field, r.value
    FROM raw_features AS r JOIN ids AS i ON i.kind = r.kind AND i.raw_id = r.raw_id
    WHERE r.kind = $kind AND r.value IS NOT NULL AND r.value <> ''
), codes AS (
    SELECT field, value,
           CAST(row_number() OVER (ORDER BY field, value) - 1 AS BIGINT) AS code,
           CAST(dense_rank() OVER (ORDER BY field) - 1 AS BIGINT) AS field_id
    FROM (SELECT DISTINCT field, value FROM known)
)
SELECT k.entity_id, c.field_id, k.field, k.value, c.code
FROM known AS k JOIN codes AS c USING (field, value)
ORDER BY k.entity_id, c.code;
