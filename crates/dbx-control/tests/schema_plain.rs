//! The schema on its plain branch: every case of `schema/cases.rs` with `postgis = off`, on a
//! server that offers PostGIS (scripts/test installs it), so that the branch a server without
//! PostGIS takes is proven on the machine CI runs. `schema` runs the same cases on the PostGIS
//! branch.

use dbx_control::migrate;
use dbx_control::postgis::{PostgisMode, PostgisState};

#[path = "schema/cases.rs"]
mod cases;
mod common;

/// The branch of the schema these tests run on.
const POSTGIS: PostgisMode = PostgisMode::Off;

#[tokio::test]
async fn a_plain_database_stays_plain_under_auto_even_with_postgis_installed_later() {
    let (_db, mut c) = cases::migrated().await;
    let state = PostgisState::read(&c).await.unwrap();
    assert!(state.available.is_some(), "the server offers PostGIS");
    assert_eq!((state.installed.as_deref(), state.endpoints), (None, false));
    assert_eq!(state.describe(POSTGIS), "not used (postgis = off)");
    // Someone installs PostGIS for their own use; dbx's schema does not change branch.
    c.batch_execute("CREATE EXTENSION postgis").await.unwrap();
    for mode in [PostgisMode::Auto, PostgisMode::Off] {
        let applied = migrate::apply_with(&mut c, mode).await.unwrap();
        assert!(applied.is_empty(), "{applied:?}");
    }
    let state = PostgisState::read(&c).await.unwrap();
    assert!(state.installed.is_some() && !state.endpoints, "{state:?}");
    assert_eq!(
        state.describe(PostgisMode::Auto),
        "not used: the database was set up without it"
    );
}
