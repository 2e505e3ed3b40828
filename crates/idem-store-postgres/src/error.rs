//! PostgreSQL's errors as the port's: a lost race is a retryable conflict,
//! a lost connection a transient one.

use idem_core::ports::StoreError;
use tokio_postgres::error::SqlState;

pub(crate) fn map_err(e: tokio_postgres::Error) -> StoreError {
    let text = e.to_string();
    let Some(db) = e.as_db_error() else {
        // No answer from the server: the connection failed or closed. A
        // transaction it held rolled back with it.
        let unreachable = ["connect", "communicat", "closed", "timed out", "timeout"]
            .iter()
            .any(|w| text.contains(w));
        return if e.is_closed() || unreachable {
            StoreError::Busy(format!("PostgreSQL connection: {text}"))
        } else {
            StoreError::Backend(text)
        };
    };
    let detail = format!("{}: {}", db.code().code(), db.message());
    let code = db.code();
    if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED {
        StoreError::Conflict(detail)
    } else if *code == SqlState::DISK_FULL {
        StoreError::DiskFull(detail)
    } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        StoreError::ReadOnly(detail)
    } else if code.code().starts_with("08")
        || code.code().starts_with("57P")
        || *code == SqlState::TOO_MANY_CONNECTIONS
        || *code == SqlState::LOCK_NOT_AVAILABLE
    {
        // Connection exceptions, an administrator's shutdown or restart:
        // the same call succeeds once the server is back.
        StoreError::Busy(detail)
    } else if *code == SqlState::DATA_CORRUPTED || *code == SqlState::INDEX_CORRUPTED {
        StoreError::Corrupt(detail)
    } else {
        StoreError::Backend(detail)
    }
}

pub(crate) fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => map_err(e),
        other => StoreError::Busy(format!("PostgreSQL pool: {other}")),
    }
}
