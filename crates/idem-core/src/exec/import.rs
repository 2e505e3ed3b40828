//! Copying jobs with their op ledgers from another ledger, as they are:
//! moving a ledger from one store to another.

use crate::job::Job;
use crate::ledger::OpRecord;
use crate::ports::StoreError;
use crate::tx::Tx;
use std::collections::HashMap;

/// Inserts each job (its state, lease, attempts, blob and timestamps as
/// given) and its ops; a job whose key the ledger already holds is left as
/// it is. Returns (copied, already there).
pub(super) fn import<T: Tx + ?Sized>(
    tx: &mut T,
    jobs: &[(Job, Vec<OpRecord>)],
) -> Result<(u64, u64), StoreError> {
    let (mut copied, mut existing) = (0, 0);
    let mut ranks: HashMap<String, u64> = HashMap::new();
    for (job, ops) in jobs {
        // Inserted as planned, then written as it is: the same two row
        // writes every store already has.
        let mut planned = Job::planned(job.spec.clone(), job.max_attempts, job.created_at);
        planned.host_rank = job.host_rank;
        if !tx.insert_job(&planned)? {
            existing += 1;
            continue;
        }
        if *job != planned {
            tx.update_job(&planned, job)?;
        }
        for op in ops {
            if op.key.job != job.key {
                return Err(StoreError::Backend(format!(
                    "op {} listed under job {}",
                    op.key, job.key
                )));
            }
            tx.insert_op(op)?;
        }
        let next = ranks.entry(job.spec.url.host()).or_default();
        *next = (*next).max(job.host_rank + 1);
        copied += 1;
    }
    for (host, next) in ranks {
        if next > tx.host_planned(&host)? {
            tx.set_host_planned(&host, next)?;
        }
    }
    Ok((copied, existing))
}
