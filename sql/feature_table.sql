-- Side features before they get dense ids: one row per (kind, raw id, field, value), kind 'user' or 'item'.
CREATE OR REPLACE TABLE raw_features (kind VARCHAR, raw_id BIGINT, field VARCHAR, value VARCHAR);
