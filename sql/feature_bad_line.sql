-- The first non-blank line of feature_lines that does not parse, and what is wrong with it.
-- $delim: the separator; $nfields: fields expected; $int_fields: 1-based fields that must be integers;
-- $flag_from: fields from this one on must be 0 or 1 (0 = no flag fields).
WITH parts AS (
    SELECT rowid + 1 AS line_no, text, string_split(text, $delim) AS f
    FROM feature_lines
    WHERE text IS NOT NULL AND trim(text) <> ''
), checked AS (
    SELECT line_no, text, len(f) AS nfields,
           list_filter($int_fields, lambda p: TRY_CAST(trim(f[p]) AS BIGINT) IS NULL) AS bad_ints,
           CASE WHEN $flag_from > 0
                THEN list_filter(range($flag_from, len(f) + 1), lambda p: trim(f[p]) NOT IN ('0', '1'))
                ELSE CAST([] AS BIGINT[])
           END AS bad_flags
    FROM parts
)
SELECT line_no, text, nfields,
       CASE WHEN nfields <> $nfields THEN 'fields' WHEN len(bad_ints) > 0 THEN 'integer' ELSE 'flag' END AS problem,
       CASE WHEN nfields <> $nfields THEN NULL ELSE coalesce(bad_ints[1], bad_flags[1]) END AS field_no
FROM checked
WHERE nfields <> $nfields OR len(bad_ints) > 0 OR len(bad_flags) > 0
ORDER BY line_no
LIMIT 1;
