//! Test data: organizations with API keys, aircraft, sessions.

use tokio_postgres::Client;
use uuid::Uuid;

/// An organization made for a test, with its clear-text API key.
#[derive(Debug, Clone)]
pub struct Org {
    /// Its id.
    pub id: Uuid,
    /// Its code.
    pub code: String,
    /// Its API key (only the SHA-256 is in the database).
    pub key: String,
}

/// Builders for test rows.
#[derive(Debug)]
pub struct Fixture;

impl Fixture {
    /// An active organization with a fresh key and an optional points-per-second limit.
    pub async fn org(client: &Client, code: &str, points_per_sec: Option<i32>) -> Org {
        let key = format!("dbx_test_{}", dbx_core::apikey::random_token(32));
        let id: Uuid = client
            .query_one(
                "INSERT INTO dbx_aviation.organizations \
                   (org_code, org_name, org_type, api_key_hash, ingest_points_per_sec) \
                 VALUES ($1, $4, 'drone_operator', encode(digest($2, 'sha256'), 'hex'), $3) \
                 RETURNING org_id",
                &[
                    &code,
                    &key,
                    &points_per_sec,
                    &format!("{code} test organization"),
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("fixture org {code}: {e:?}"))
            .get(0);
        Org {
            id,
            code: code.to_string(),
            key,
        }
    }

    /// An active aircraft of `org`.
    pub async fn aircraft(client: &Client, org: Uuid, registration: &str) -> Uuid {
        let row = client
            .query_one(
                "INSERT INTO dbx_aviation.aircraft_registry \
                   (org_id, registration_number, aircraft_type, manufacturer, model) \
                 VALUES ($1, $2, 'quadcopter', 'DBX Aerospace', 'Q-4') RETURNING aircraft_id",
                &[&org, &registration],
            )
            .await
            .unwrap_or_else(|e| panic!("fixture aircraft {registration}: {e:?}"));
        row.get(0)
    }
}
