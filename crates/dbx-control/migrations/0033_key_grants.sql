-- 0033 key_grants: only the owner mints API keys.
--
-- 0020 let dbx_app_write manage keys "like organizations", so the application user
-- (dbx_api_service) could create a key for any organization it can see. Minting a key is
-- granting access to the ingest path; it is now reserved to dbx_admin (the owner: `dbx key
-- create`, `dbx org create`, `dbx setup`) and superusers. Every way to mint one is closed:
--   * api_keys: dbx_app_write keeps SELECT and DELETE (deleting a key only withdraws access)
--     but loses INSERT and UPDATE (an UPDATE of key_hash, or of revoked_at back to NULL, would
--     mint one as well);
--   * organizations: its api_key_hash is mirrored into api_keys by the SECURITY DEFINER trigger
--     sync_primary_api_key (0020) and honoured by the listener on its own, so dbx_app_write
--     loses INSERT (a new organization carries a new key) and UPDATE of api_key_hash,
--     api_key_encrypted and org_id; every other column stays writable.
-- dbx_ingest's grants (read keys, stamp last_used_at) are unchanged.

SET LOCAL ROLE dbx_admin;

REVOKE INSERT, UPDATE ON dbx_aviation.api_keys FROM dbx_app_write;

REVOKE INSERT, UPDATE ON dbx_aviation.organizations FROM dbx_app_write;
GRANT UPDATE (org_code, org_name, org_type, subscription_tier, api_rate_limit, ingest_points_per_sec,
              storage_quota_gb, compliance_level, data_retention_days, encryption_enabled, is_active,
              updated_at)
    ON dbx_aviation.organizations TO dbx_app_write;
