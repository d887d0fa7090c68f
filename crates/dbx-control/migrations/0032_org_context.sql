-- 0032 org_context: the tenant context of row-level security lives as long as one transaction.
--
-- Redefines
--   * dbx_aviation.set_org_context(uuid): set_config('app.current_org_id', ..., true), i.e.
--     transaction-scoped. 0004 set it for the whole session, so a pooled connection handed to
--     the next user still carried the previous tenant's context; now it is gone at COMMIT or
--     ROLLBACK. Callers run it inside their transaction:
--         BEGIN; SELECT dbx_aviation.set_org_context($1); ...queries...; COMMIT;
--     Called outside a transaction block it only lasts for its own statement (RLS then shows
--     nothing to the next statement: fail closed, never open).
--   Owner (dbx_admin) and grants are those of 0004: CREATE OR REPLACE keeps them.

SET LOCAL ROLE dbx_admin;

CREATE OR REPLACE FUNCTION dbx_aviation.set_org_context(p_org_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- Transaction-scoped (is_local = true): nothing survives COMMIT/ROLLBACK on a pooled connection.
    PERFORM set_config('app.current_org_id', COALESCE(p_org_id::text, ''), true);
END
$$;
COMMENT ON FUNCTION dbx_aviation.set_org_context(uuid) IS 'Sets app.current_org_id until the end of the current transaction; RLS then shows only that organization''s rows (NULL: none). Call it after BEGIN';
