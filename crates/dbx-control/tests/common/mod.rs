//! Helpers the dbx-control integration tests share.
#![allow(dead_code)]

use tokio_postgres::Client;
use uuid::Uuid;

/// The single `bigint` a counting query returns.
pub async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Inserts an organization `code` ("<code> Inc") with `retention_days`, by plain SQL.
pub async fn new_org(c: &Client, code: &str, retention_days: i32) -> Uuid {
    c.query_one(
        "INSERT INTO dbx_aviation.organizations (org_code, org_name, org_type, api_key_hash, data_retention_days)
         VALUES ($1::text, $1::text || ' Inc', 'drone_operator', dbx_aviation.generate_api_key_hash($1), $2)
         RETURNING org_id",
        &[&code, &retention_days],
    )
    .await
    .unwrap()
    .get(0)
}
