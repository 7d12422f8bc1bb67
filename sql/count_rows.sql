-- Rows in one table of the working database.
SELECT count(*) FROM query_table($table);
