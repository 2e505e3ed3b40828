//! Opening a ledger: refusing what is not one, configuring the
//! connections, and mapping SQLite's errors into the port's.

use crate::schema::{migrate, APPLICATION_ID, LATEST};
use crate::{Durability, Options};
use idem_core::ports::StoreError;
use rusqlite::{Connection, ErrorCode};
use std::io::Read;
use std::path::Path;

/// Page cache per connection, in KiB (see `configure` for why no more).
const CACHE_KIB: u32 = 16 * 1024;

pub(crate) fn map_err(e: rusqlite::Error) -> StoreError {
    let text = e.to_string();
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy(text),
        Some(ErrorCode::DiskFull) => StoreError::DiskFull(text),
        Some(ErrorCode::ReadOnly) => StoreError::ReadOnly(text),
        Some(ErrorCode::NotADatabase) => StoreError::NotALedger(text),
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt(text),
        Some(ErrorCode::CannotOpen) => StoreError::Backend(format!("cannot open: {text}")),
        _ => StoreError::Backend(text),
    }
}

/// Opens the writer and reader connections, after checking that the file is
/// an idem ledger (or absent/empty) and migrating it.
pub(crate) fn open(
    path: &Path,
    opts: &Options,
) -> Result<(Connection, Connection, std::fs::File), StoreError> {
    let shown = path.display();
    match std::fs::metadata(path) {
        // A device (`/dev/null`), a FIFO (whose open would block) or a
        // directory is never a ledger, and SQLite would make files beside it.
        Ok(m) if m.is_dir() => {
            return Err(StoreError::NotALedger(format!(
                "{shown} is a directory, not a ledger file"
            )))
        }
        Ok(m) if !m.is_file() => {
            return Err(StoreError::NotALedger(format!(
                "{shown} is not a regular file (a device, FIFO or socket); a ledger is a file; refusing to touch it"
            )))
        }
        Ok(_) => {
            let mut f = std::fs::File::open(path).map_err(|e| with_path(StoreError::Backend(e.to_string()), path))?;
            let mut magic = [0u8; 16];
            let n = f.read(&mut magic).unwrap_or(0);
            if n > 0 && (n < 16 || &magic != b"SQLite format 3\0") {
                return Err(StoreError::NotALedger(format!(
                    "{shown} is not an idem ledger (not a SQLite database); refusing to touch it"
                )));
            }
        }
        Err(_) => create_private(path)?,
    }
    let conn = Connection::open(path).map_err(|e| with_path(map_err(e), path))?;
    conn.busy_timeout(std::time::Duration::from_millis(opts.busy_timeout_ms))
        .map_err(map_err)?;
    let app_id: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| with_path(map_err(e), path))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(map_err)?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(map_err)?;
    if app_id != APPLICATION_ID && (app_id != 0 || tables > 0) {
        return Err(StoreError::NotALedger(format!(
            "{shown} is a SQLite database but not an idem ledger; refusing to touch it"
        )));
    }
    if version > LATEST {
        return Err(StoreError::TooNew {
            found: version,
            supported: LATEST,
        });
    }
    if tables == 0 {
        // Set before the first table exists, or it takes a VACUUM.
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL;")
            .map_err(|e| with_path(map_err(e), path))?;
    }
    configure(&conn, opts, path)?;
    migrate(&conn, path)?;
    if opts.durability == Durability::Full {
        // Migrations ran at FULL; from here on the group commit fsyncs the
        // log itself after each durable batch (see group.rs).
        conn.execute_batch("PRAGMA synchronous = NORMAL;")
            .map_err(map_err)?;
    }
    let reader = Connection::open(path).map_err(map_err)?;
    reader
        .busy_timeout(std::time::Duration::from_millis(opts.busy_timeout_ms))
        .map_err(map_err)?;
    reader
        .execute_batch(&format!(
            "PRAGMA query_only = ON; PRAGMA cache_size = -{CACHE_KIB};"
        ))
        .map_err(map_err)?;
    reader.set_prepared_statement_cache_capacity(128);
    let lock = private_options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(path))
        .map_err(|e| StoreError::Backend(format!("{}: {e}", lock_path(path).display())))?;
    Ok((conn, reader, lock))
}

/// Open options that create a file readable by its owner only: the ledger
/// holds URLs whole, secrets included. SQLite gives its `-wal` and `-shm`
/// files the ledger's own mode.
fn private_options() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o
}

/// Creates an empty ledger file, private to its owner (a ledger made by
/// another process meanwhile is left as it is).
fn create_private(path: &Path) -> Result<(), StoreError> {
    match private_options().write(true).create_new(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Backend(format!("{}: {e}", path.display()))),
    }
}

/// The writers' lock file beside the ledger (see `group.rs`).
pub(crate) fn lock_path(db: &Path) -> std::path::PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-writer.lock");
    std::path::PathBuf::from(s)
}

pub(crate) fn with_path(e: StoreError, path: &Path) -> StoreError {
    match e {
        StoreError::Backend(t) => StoreError::Backend(format!("{}: {t}", path.display())),
        StoreError::ReadOnly(t) => StoreError::ReadOnly(format!("{}: {t}", path.display())),
        StoreError::NotALedger(t) => StoreError::NotALedger(format!(
            "{} is not an idem ledger ({t}); refusing to touch it",
            path.display()
        )),
        other => other,
    }
}

fn configure(conn: &Connection, opts: &Options, path: &Path) -> Result<(), StoreError> {
    let sync = match opts.durability {
        Durability::Full | Durability::Strict => "FULL",
        Durability::Normal => "NORMAL",
    };
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| with_path(map_err(e), path))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Backend(format!(
            "{}: could not enable WAL (journal_mode is {mode}); is the directory writable and on a local filesystem?",
            path.display()
        )));
    }
    // Every store call uses cached statements; the default cache (16) is
    // smaller than the set in use, and re-preparing costs more than running.
    conn.set_prepared_statement_cache_capacity(128);
    // 16 MiB of page cache, not more: SQLite's page cache scans its whole
    // hash table (one slot per cached page) at the end of every write
    // transaction that split a b-tree page (the split renumbers pages
    // through the lock-byte page, past the end of the file). With 64 MiB
    // that scan took 7% of a 16-worker run's CPU, inside the writer's
    // critical section; 16 MiB runs it 25% faster and plans as fast.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; PRAGMA cache_size = -{CACHE_KIB}; PRAGMA temp_store = MEMORY;"
    ))
    .map_err(map_err)
}

pub(crate) fn check_integrity(c: &Connection, thorough: bool) -> Result<Vec<String>, StoreError> {
    let sql = if thorough {
        "PRAGMA integrity_check(100)"
    } else {
        "PRAGMA quick_check(100)"
    };
    let mut st = c.prepare(sql).map_err(map_err)?;
    let rows = st
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(map_err)?;
    let found: Vec<String> = rows.collect::<Result<_, _>>().map_err(map_err)?;
    Ok(found.into_iter().filter(|r| r != "ok").collect())
}
