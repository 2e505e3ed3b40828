//! `idem plan`: inputs read and parsed on their own thread, one batch ahead
//! of the ledger; rejected lines counted and sampled; conflicts reported.

use crate::commands::{now, open_store, print_json};
use crate::input::{self, BadLine, Item};
use crate::sink::EventsFile;
use crate::{Global, PlanArgs, EXIT_PARTIAL};
use anyhow::bail;
use idem_core::ports::Store;
use idem_core::{JobSpec, PlanCounts, PlanOutcome};
use idem_worker::EventSink as _;
use serde_json::json;
use std::io::IsTerminal;

/// Rejected lines: how many, and the first of them (kept for the report;
/// an input of millions of bad lines must not be held in memory).
#[derive(Default)]
struct Rejected {
    count: u64,
    sample: Vec<BadLine>,
}

/// Rejected lines kept for the report, and warned about one by one.
const REJECTED_SHOWN: usize = 1000;

impl Rejected {
    fn add(&mut self, b: BadLine, bar: Option<&indicatif::ProgressBar>) {
        self.count += 1;
        if self.sample.len() < REJECTED_SHOWN {
            warn(bar, &b);
            self.sample.push(b);
        }
    }

    /// The line that says how many were not shown, if any were not.
    fn warn_rest(&self) {
        let rest = self.count - self.sample.len() as u64;
        if rest > 0 {
            eprintln!("idem: … and {rest} more rejected line(s) not shown");
        }
    }
}

pub(crate) fn plan(g: &Global, a: &PlanArgs) -> anyhow::Result<u8> {
    let opts = input::ReadOptions {
        allow_unknown_fields: a.allow_unknown_fields,
    };
    if a.strict {
        // First pass: validate everything, apply nothing on any error.
        let mut bad = Rejected::default();
        for f in &a.files {
            if f == "-" {
                bail!("--strict needs files, not stdin: it reads the input twice (once to check, once to apply)");
            }
            input::read(f, opts, |it| {
                if let Item::Bad(b) = it {
                    bad.add(b, None);
                }
                Ok(())
            })?;
        }
        if bad.count > 0 {
            bad.warn_rest();
            report_plan(a.json, PlanCounts::default(), &bad, &[], true)?;
            return Ok(EXIT_PARTIAL);
        }
    }
    let store = open_store(g)?;
    let events = a.events.as_deref().map(EventsFile::open).transpose()?;
    if let Some(file) = &a.metrics_textfile {
        crate::sink::install_exporter(None, Some(file))?;
    }
    let mut counts = PlanCounts::default();
    let mut conflicts: Vec<serde_json::Value> = Vec::new();
    // Millions of lines take minutes: a terminal gets a running count.
    let bar = (!a.json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {human_pos} jobs applied  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    });
    // Reading and parsing run on their own thread, one batch ahead of the
    // ledger: a parsed line costs about as much as its insert, so the two
    // stages together take little longer than the ledger alone.
    let (applied, bad) = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<PlanBatch>(1);
        let reader_bar = bar.clone();
        let reader =
            s.spawn(move || read_batches(&a.files, a.batch, opts, &tx, reader_bar.as_ref()));
        let mut applied = Ok(());
        for batch in rx {
            // On an error `rx` is dropped here, so the reader stops at its
            // next batch.
            applied = apply_plan(
                &store,
                a.max_attempts,
                &batch,
                events.as_ref(),
                &mut counts,
                &mut conflicts,
                bar.as_ref(),
            );
            if applied.is_err() {
                break;
            }
            if let Some(bar) = &bar {
                bar.inc(batch.specs.len() as u64);
                let secs = bar.elapsed().as_secs_f64().max(0.001);
                bar.set_message(format!("{:.0} jobs/s", bar.position() as f64 / secs));
            }
        }
        let bad = reader.join().unwrap_or_else(|_| {
            (
                Rejected::default(),
                Err(anyhow::anyhow!("the input reader panicked")),
            )
        });
        (applied, bad)
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let (bad, read) = bad;
    bad.warn_rest();
    // What was applied is reported whatever stopped the rest: a missing
    // second file must not hide the first file's jobs.
    report_plan(a.json, counts, &bad, &conflicts, false)?;
    if a.metrics_textfile.is_some() {
        idem_telemetry::record_status(&store.status(now())?, &crate::ledger::id(g));
        crate::sink::flush_textfile()?;
    }
    applied?;
    read?;
    if let Some(e) = events.as_ref().and_then(EventsFile::error) {
        bail!("{e}");
    }
    Ok(if bad.count == 0 && counts.conflicts == 0 {
        0
    } else {
        EXIT_PARTIAL
    })
}

/// Parsed jobs on their way to the ledger, with where each came from.
#[derive(Default)]
struct PlanBatch {
    specs: Vec<JobSpec>,
    origins: Vec<(String, u64)>,
}

/// Reads every input in batches of `size` and sends them on; reports bad
/// lines on stderr and returns them, with the error that stopped reading
/// if one did. Stops early, without error, when the receiver has gone (the
/// ledger side failed and reports why).
fn read_batches(
    files: &[String],
    size: usize,
    opts: input::ReadOptions,
    tx: &std::sync::mpsc::SyncSender<PlanBatch>,
    bar: Option<&indicatif::ProgressBar>,
) -> (Rejected, anyhow::Result<()>) {
    struct Gone;
    let mut bad = Rejected::default();
    let mut batch = PlanBatch::default();
    let send = |batch: &mut PlanBatch| -> Result<(), Gone> {
        if batch.specs.is_empty() {
            return Ok(());
        }
        tx.send(std::mem::take(batch)).map_err(|_| Gone)
    };
    let mut gone = false;
    for f in files {
        let r = input::read(f, opts, |it| {
            match it {
                Item::Spec { spec, file, line } => {
                    batch.specs.push(spec);
                    batch.origins.push((file, line));
                    if batch.specs.len() >= size && send(&mut batch).is_err() {
                        gone = true;
                        bail!("the ledger side stopped");
                    }
                }
                Item::Bad(b) => bad.add(b, bar),
            }
            Ok(())
        });
        if gone {
            return (bad, Ok(()));
        }
        if let Err(e) = r {
            // What was read before the error is still applied.
            let _ = send(&mut batch);
            return (bad, Err(e));
        }
    }
    // A failed send means the ledger side failed; it reports the error.
    let _ = send(&mut batch);
    (bad, Ok(()))
}

/// A warning on stderr that does not tear through a progress bar.
fn warn(bar: Option<&indicatif::ProgressBar>, msg: impl std::fmt::Display) {
    match bar {
        Some(bar) => bar.suspend(|| eprintln!("idem: {msg}")),
        None => eprintln!("idem: {msg}"),
    }
}

/// Plans one batch and tallies its outcomes; a conflict is reported on
/// stderr with the line it came from.
fn apply_plan(
    store: &crate::ledger::Ledger,
    max_attempts: u32,
    batch: &PlanBatch,
    events: Option<&EventsFile>,
    counts: &mut PlanCounts,
    conflicts: &mut Vec<serde_json::Value>,
    bar: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<()> {
    let r = store.plan(&batch.specs, max_attempts, now())?;
    if let Some(ev) = events {
        ev.emit(&r.events);
    }
    // Planned jobs and conflicts, for a metrics textfile (a no-op without
    // an installed recorder).
    crate::sink::Metrics.emit(&r.events);
    for (o, (file, line)) in r.value.iter().zip(&batch.origins) {
        counts.add(o);
        if let PlanOutcome::Conflict(c) = o {
            if conflicts.len() < REJECTED_SHOWN {
                warn(
                    bar,
                    format_args!("{file}:{line}: key conflict for job {}: planned with {} but this line has {}; not applied",
                    c.job_key, input::cut(&c.existing_url, 200), input::cut(&c.proposed_url, 200)),
                );
                conflicts.push(json!({"file": file, "line": line, "job_key": c.job_key,
                    "existing_url": c.existing_url, "proposed_url": c.proposed_url}));
            }
        }
    }
    Ok(())
}

fn report_plan(
    json: bool,
    c: PlanCounts,
    bad: &Rejected,
    conflicts: &[serde_json::Value],
    aborted: bool,
) -> anyhow::Result<()> {
    if json {
        print_json(&json!({
            "planned": c.planned, "existing": c.existing, "conflicts": c.conflicts,
            "rejected": bad.count, "aborted": aborted,
            "errors": bad.sample,
            "conflict_details": conflicts,
        }))
    } else {
        if aborted {
            outln!(
                "nothing applied: {} malformed line(s) (--strict)",
                bad.count
            );
        } else {
            outln!(
                "planned {}, existing {}, conflicts {}, rejected {}",
                c.planned,
                c.existing,
                c.conflicts,
                bad.count
            );
        }
        Ok(())
    }
}
