//! A schema that is not an idem ledger, or a newer ledger, is refused and
//! left untouched.

use super::url;
use crate::{Options, PgStore};
use idem_core::StoreError;

fn opts(schema: &str) -> Options {
    Options {
        schema: Some(schema.to_owned()),
        ..Options::default()
    }
}

fn psql(url: &str, sql: &str) {
    let st = std::process::Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .status()
        .expect("psql runs");
    assert!(st.success(), "psql {sql}");
}

#[test]
fn a_foreign_schema_or_a_newer_ledger_is_refused_untouched() {
    let Some(url) = url() else { return };
    let pid = std::process::id();
    let foreign = format!("idem_foreign_{pid}");
    psql(
        &url,
        &format!("DROP SCHEMA IF EXISTS {foreign} CASCADE; CREATE SCHEMA {foreign}; CREATE TABLE {foreign}.invoices (id int)"),
    );
    let e = PgStore::connect(&url, &opts(&foreign)).unwrap_err();
    assert!(matches!(e, StoreError::NotALedger(_)), "{e}");
    assert!(!e.to_string().contains("password"));

    let newer = format!("idem_newer_{pid}");
    psql(&url, &format!("DROP SCHEMA IF EXISTS {newer} CASCADE"));
    drop(PgStore::connect(&url, &opts(&newer)).expect("a new ledger"));
    psql(
        &url,
        &format!("UPDATE {newer}.idem_ledger SET schema_version = 99"),
    );
    let e = PgStore::connect(&url, &opts(&newer)).unwrap_err();
    assert!(matches!(e, StoreError::TooNew { found: 99, .. }), "{e}");
}
