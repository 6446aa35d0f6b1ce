-- Nothing was added (see the up migration).
SELECT 1;
