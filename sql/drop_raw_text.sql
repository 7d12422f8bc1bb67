-- The text staging table is not needed once the typed ratings exist; free its space.
DROP TABLE raw_text;
