-- 0031 request_log: api_requests stops growing with every refused handshake.
--
-- Creates
--   * dbx_aviation.api_requests.request_count integer NOT NULL DEFAULT 1: how many handshakes one
--     row stands for. The daemon (crates/dbx-listener/src/audit.rs) collapses refused handshakes
--     (status_code <> 200) from one client IP with the same status, transport and organization
--     within one flush window (about a second) into one row; accepted handshakes keep one row
--     each (count 1), and every row written before this migration counts 1 (the default).
--     `sum(request_count)` is the number of handshakes, `count(*)` the number of rows.
--     The CHECK is NOT VALID: existing rows all hold the default, and validating would scan the
--     table under the ALTER's lock; new and updated rows are checked.
--
-- The retention of the table (partitions.api_requests_retention_days, default 30, enforced by
-- the control plane in chunks) deletes by created_at through api_requests_created (0002).

SET LOCAL ROLE dbx_admin;

ALTER TABLE dbx_aviation.api_requests ADD COLUMN request_count integer NOT NULL DEFAULT 1;
ALTER TABLE dbx_aviation.api_requests
    ADD CONSTRAINT api_requests_request_count_check CHECK (request_count >= 1) NOT VALID;
COMMENT ON COLUMN dbx_aviation.api_requests.request_count IS 'Handshakes this row stands for: refused handshakes from one client IP with one status and transport within a flush window (about a second) are one row; accepted ones are one row each';
