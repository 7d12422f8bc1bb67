-- Forget titles read only in part (an unreadable titles file leaves every title null).
DELETE FROM titles;
