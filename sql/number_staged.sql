-- Generic files: number the staged rows (rowid follows file order; $first_line skips a header).
CREATE TABLE raw_text AS
SELECT src, rowid + $first_line AS line_no, concat_ws(',', u, i, r, t) AS text, 4 AS nfields, u, i, r, t
FROM staged;
