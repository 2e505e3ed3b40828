//! `idem cancel`: the operator ends jobs that are not finished.

use crate::commands::{now, open_store, parse_job, print_json};
use crate::{CancelArgs, Global, EXIT_PARTIAL};
use idem_core::ports::Store;
use idem_core::{Command, JobKey};
use serde_json::json;

pub(crate) fn cancel(g: &Global, a: &CancelArgs) -> anyhow::Result<u8> {
    let store = open_store(g)?;
    let keys: Vec<JobKey> = a
        .jobs
        .iter()
        .map(|s| parse_job(s))
        .collect::<anyhow::Result<_>>()?;
    let mut cancelled = 0u64;
    let mut refused = Vec::new();
    for k in &keys {
        match store.apply(k, Command::Cancel, now()) {
            Ok(_) => cancelled += 1,
            Err(e) => refused.push(json!({"job_key": k, "error": e.to_string()})),
        }
    }
    if a.json {
        print_json(&json!({"cancelled": cancelled, "refused": refused}))?;
    } else {
        outln!("cancelled {cancelled} job(s)");
        for r in &refused {
            tracing::warn!(
                job = r["job_key"].as_str().unwrap_or(""),
                "not cancelled: {}",
                r["error"].as_str().unwrap_or("")
            );
        }
    }
    Ok(if refused.is_empty() { 0 } else { EXIT_PARTIAL })
}
