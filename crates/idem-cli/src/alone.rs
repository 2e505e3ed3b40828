//! Suspects run alone: the parent side (`ChildRunner`, the engine's
//! `Isolator`: this same binary, with the parent's arguments and the job to
//! run) and the child side (`child`: run that one job, and die with the
//! parent).

use idem_core::{Epoch, JobKey, WorkerId};
use idem_worker::{ChildEnd, Isolator};
use std::ffi::OsString;
use std::process::{Command, Stdio};

/// Runs a job in a child `idem run` that acts as this worker.
pub(crate) struct ChildRunner {
    exe: std::path::PathBuf,
    args: Vec<OsString>,
}

impl ChildRunner {
    /// A runner that starts this binary with the arguments this process got.
    pub(crate) fn from_this_process() -> std::io::Result<Self> {
        Ok(Self {
            exe: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

impl Isolator for ChildRunner {
    fn run_alone(&self, job: &JobKey, epoch: Epoch, owner: &WorkerId) -> std::io::Result<ChildEnd> {
        let status = Command::new(&self.exe)
            .args(&self.args)
            .arg("--alone-job")
            .arg(job.to_hex())
            .arg("--alone-epoch")
            .arg(epoch.0.to_string())
            .arg("--alone-owner")
            .arg(owner.as_str())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()?;
        Ok(match status.code() {
            Some(code) => ChildEnd::Exited(code),
            None => ChildEnd::Killed(signal_name(status)),
        })
    }
}

#[cfg(unix)]
fn signal_name(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(6) => "SIGABRT".into(),
        Some(7) => "SIGBUS".into(),
        Some(2) => "SIGINT".into(),
        Some(9) => "SIGKILL".into(),
        Some(15) => "SIGTERM".into(),
        Some(11) => "SIGSEGV".into(),
        Some(n) => format!("signal {n}"),
        None => "an unknown signal".into(),
    }
}

#[cfg(not(unix))]
fn signal_name(_: std::process::ExitStatus) -> String {
    "an unknown signal".into()
}

/// The job a child runs, from its hidden flags.
pub(crate) struct AloneJob {
    pub(crate) key: JobKey,
    pub(crate) epoch: Epoch,
    pub(crate) owner: WorkerId,
}

impl AloneJob {
    pub(crate) fn parse(key: &str, epoch: u64, owner: &str) -> anyhow::Result<Self> {
        Ok(Self {
            key: JobKey::parse_hex(key).map_err(|e| anyhow::anyhow!("--alone-job {key:?}: {e}"))?,
            epoch: Epoch(epoch),
            owner: WorkerId::new(owner),
        })
    }
}

/// Exits at once when the parent dies: a child whose parent was killed
/// leaves its job to be taken over, and its death is then nobody's fault.
pub(crate) fn die_with_parent() {
    #[cfg(unix)]
    {
        let parent = std::os::unix::process::parent_id();
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(1);
            }
        });
    }
}
