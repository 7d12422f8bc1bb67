-- Every column of feature_rows but raw_id is one field; a cell may hold several values separated by '|'.
INSERT INTO raw_features
SELECT $kind, CAST(trim(raw_id) AS BIGINT), field, trim(unnest(string_split(value, '|')))
FROM (UNPIVOT feature_rows ON COLUMNS(* EXCLUDE (raw_id)) INTO NAME field VALUE value);
