-- Item titles, filled by a titles_*.sql loader where the data set has them (else left empty).
CREATE TABLE titles (raw_item BIGINT, title VARCHAR);
