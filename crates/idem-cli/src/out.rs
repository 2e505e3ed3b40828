//! Standard output that a closed pipe does not crash: once the reader has
//! gone (`idem status | head -1`), output stops quietly and the command
//! finishes with its own exit code.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write found stdout's reader gone.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes one line to stdout; a closed pipe ends output, not the command.
pub(crate) fn line(args: std::fmt::Arguments<'_>) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            CLOSED.store(true, Ordering::Relaxed);
        } else {
            // Anything else (a full disk behind a redirect) is worth a word.
            eprintln!("idem: writing to stdout: {e}");
            CLOSED.store(true, Ordering::Relaxed);
        }
    }
}

/// `r`, with a closed pipe counted as done.
pub(crate) fn tolerate(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        r => r,
    }
}

/// Whether `e` is stdout's reader having gone away.
pub(crate) fn is_closed_pipe(e: &anyhow::Error) -> bool {
    let pipe = Some(std::io::ErrorKind::BrokenPipe);
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().map(std::io::Error::kind) == pipe
            || c.downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind)
                == pipe
            || c.downcast_ref::<csv::Error>()
                .is_some_and(|e| match e.kind() {
                    csv::ErrorKind::Io(io) => Some(io.kind()) == pipe,
                    _ => false,
                })
    })
}
