-- Auditors hold their own copies of the checkpoints they fetched; the
-- server's copies go with the table.
DROP TABLE signed_checkpoints;
