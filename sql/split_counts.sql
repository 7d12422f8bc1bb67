-- Sizes of the split, checked before anything is written.
SELECT
    (SELECT count(*) FROM positives) AS positives,
    (SELECT count(DISTINCT user_id) FROM positives) AS users,
    (SELECT count(*) FROM new_user_ids) AS new_users,
    (SELECT count(*) FROM remaining WHERE in_history) AS history,
    (SELECT count(*) FROM remaining WHERE NOT in_history) AS stream;
