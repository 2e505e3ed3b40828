//! The content-addressed blob store under `<out>/blobs/sha256/<aa>/<bb>/`:
//! publishing a part at its address (never overwriting), finding what is
//! already there, and setting aside what is not what its name says.

use crate::files::{
    create_dir_durable, hash_file, not_regular, open_regular, remove_part, sync_dir, OutDir,
};
use idem_core::{BlobInfo, Digest32, JobKey};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// Whether publishing stored new content or found it already there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Published {
    New(BlobInfo),
    AlreadyStored(BlobInfo),
    /// Stored, replacing a file at the address that was not this content;
    /// that file was moved to the path given, for inspection.
    Replaced(BlobInfo, PathBuf),
}

/// Whether the file at `path` is a regular file holding `size` bytes that
/// hash to `sha`.
pub fn holds(path: &Path, sha: &Digest32, size: u64) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.len() == size)
        && hash_file(path).is_ok_and(|(got, n)| got == *sha && n == size)
}

/// Checks that each directory from `root` down to `dir` is a real
/// directory, not a link to one elsewhere.
pub(crate) fn check_real_dirs(root: &Path, dir: &Path) -> io::Result<()> {
    let mut p = dir;
    while p != root {
        if !fs::symlink_metadata(p)?.is_dir() {
            return Err(not_regular(p, "not a directory idem made"));
        }
        p = match p.parent() {
            Some(up) if up.starts_with(root) => up,
            _ => break,
        };
    }
    Ok(())
}

/// Publishes a fully written, fsynced part under its content address.
///
/// The part is hard-linked to its address, which fails if the address is
/// taken: of two jobs with the same content publishing at once, exactly one
/// stores it and the other learns it is a duplicate (a rename would let both
/// "win"). The part's name is then removed and the directory fsynced.
///
/// A file already at the address is trusted only if it is a regular file
/// with this size and digest (idem may not have written it); otherwise it
/// is moved to `<out>/quarantine/` and the part is linked in its place.
pub fn publish(out: &OutDir, part: &Path, sha: Digest32, size: u64) -> io::Result<Published> {
    let published = link_blob(out, part, sha, size, true)?;
    match published {
        // Found, not written here: perhaps by a process that died before
        // making it durable.
        Published::AlreadyStored(_) => sync_blob(out, &sha)?,
        _ => sync_dir(&blob_dir(out, &sha)?)?,
    }
    remove_part(part);
    Ok(published)
}

/// Whether the blob at `sha`'s address is this job's own publish (so the
/// job is `finalized` by it, not a duplicate): true unless one of the
/// job's parts (up to `epoch`) is still there and is not that file. A
/// publisher drops the part's name only after the blob is durable, so a
/// part that is the blob's other name was linked by this job, and a part
/// that is another file was not.
pub fn published_by(out: &OutDir, job: &JobKey, epoch: u64, sha: &Digest32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(blob) = fs::symlink_metadata(out.blob_path(sha)) else {
        return false;
    };
    let parts: Vec<fs::Metadata> = out
        .parts_of(job, epoch)
        .iter()
        .filter_map(|p| fs::symlink_metadata(p).ok())
        .collect();
    parts.is_empty()
        || parts
            .iter()
            .any(|m| m.dev() == blob.dev() && m.ino() == blob.ino())
}

/// fsyncs a stored blob and each directory from its own up to the blob
/// root, for a blob found in place (left by a crash, or another process)
/// before anything is committed that names it.
pub fn sync_blob(out: &OutDir, sha: &Digest32) -> io::Result<()> {
    open_regular(&out.blob_path(sha), OpenOptions::new().read(true))?.sync_all()?;
    let top = out.root().join("blobs");
    let mut dir = blob_dir(out, sha)?;
    loop {
        sync_dir(&dir)?;
        if dir == top || !dir.pop() || !dir.starts_with(&top) {
            return Ok(());
        }
    }
}

/// The directory a blob's address is in.
fn blob_dir(out: &OutDir, sha: &Digest32) -> io::Result<PathBuf> {
    out.blob_path(sha)
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| io::Error::other("blob path has no parent"))
}

/// [`publish`]'s first half: the part linked at its address (or found
/// already stored there). With `durable_dirs`,
/// directories it creates are fsynced into their parents; either way the
/// new link itself is not yet durable and the part keeps its name: the
/// caller makes the link durable (an fsync of the directory, or one
/// `syncfs` for a whole batch) and then removes the part.
pub fn link_blob(
    out: &OutDir,
    part: &Path,
    sha: Digest32,
    size: u64,
    durable_dirs: bool,
) -> io::Result<Published> {
    let dest = out.blob_path(&sha);
    let info = BlobInfo::new(sha, size);
    let dir = blob_dir(out, &sha)?;
    if durable_dirs {
        create_dir_durable(&dir)?;
    } else {
        fs::create_dir_all(&dir)?;
    }
    check_real_dirs(out.root(), &dir)?;
    // The part itself, through its descriptor: a link at its name is
    // refused, and only the file idem wrote loses its write bits, once it
    // is stored (a part whose link failed stays writable for a retry).
    let file = open_regular(part, OpenOptions::new().read(true))?;
    let mut replaced = None;
    loop {
        match fs::hard_link(part, &dest) {
            Ok(()) => {
                set_read_only(&file)?;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && replaced.is_none() => {
                if holds(&dest, &sha, size) {
                    return Ok(Published::AlreadyStored(info));
                }
                replaced = Some(quarantine(out, &dest)?);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(match replaced {
        Some(aside) => Published::Replaced(info, aside),
        None => Published::New(info),
    })
}

/// Moves a file that is not the content its address names out of the
/// store, to `<out>/quarantine/<name>.<unix-ms>`, where an operator can
/// look at it.
pub fn quarantine(out: &OutDir, bad: &Path) -> io::Result<PathBuf> {
    let dir = out.root().join("quarantine");
    create_dir_durable(&dir)?;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let name = bad
        .file_name()
        .map_or_else(|| "blob".into(), |n| n.to_string_lossy().into_owned());
    let aside = dir.join(format!("{name}.{ms}"));
    fs::rename(bad, &aside)?;
    sync_dir(&dir)?;
    Ok(aside)
}

/// Removes the write bits of a file idem wrote, keeping the rest of the
/// mode its creation under the umask gave it.
#[cfg(unix)]
fn set_read_only(f: &File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = f.metadata()?.permissions().mode();
    f.set_permissions(fs::Permissions::from_mode(mode & !0o222))
}

#[cfg(not(unix))]
fn set_read_only(_: &File) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_links_once_and_reports_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let out = OutDir::prepare(dir.path().join("out")).unwrap();
        let body = b"same bytes";
        let sha = Digest32::of(body);
        let part_a = out.part_path(&idem_core::job_key_of("w", "a"));
        let part_b = out.fallback_part_path(&idem_core::job_key_of("w", "b"), 3);
        fs::write(&part_a, body).unwrap();
        fs::write(&part_b, body).unwrap();
        assert!(matches!(
            publish(&out, &part_a, sha, 10).unwrap(),
            Published::New(_)
        ));
        assert!(matches!(
            publish(&out, &part_b, sha, 10).unwrap(),
            Published::AlreadyStored(_)
        ));
        assert!(!part_a.exists() && !part_b.exists(), "parts are gone");
        let stored = out.blob_path(&sha);
        assert_eq!(fs::read(&stored).unwrap(), body);
        assert!(fs::metadata(&stored).unwrap().permissions().readonly());
    }

    /// A file at a blob's address with other bytes is not trusted: it is
    /// moved aside and replaced by the verified content.
    #[test]
    fn a_wrong_file_at_a_blob_address_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let out = OutDir::prepare(dir.path().join("out")).unwrap();
        let body = b"the real bytes";
        let sha = Digest32::of(body);
        let dest = out.blob_path(&sha);
        create_dir_durable(dest.parent().unwrap()).unwrap();
        fs::write(&dest, b"planted!").unwrap();
        let part = out.part_path(&idem_core::job_key_of("w", "a"));
        fs::write(&part, body).unwrap();
        let Published::Replaced(_, aside) = publish(&out, &part, sha, 14).unwrap() else {
            panic!("not replaced");
        };
        assert_eq!(fs::read(&dest).unwrap(), body);
        assert_eq!(fs::read(&aside).unwrap(), b"planted!");
        assert!(aside.starts_with(out.root().join("quarantine")));
        // The same content again is a duplicate of what is now stored.
        fs::write(&part, body).unwrap();
        assert!(matches!(
            publish(&out, &part, sha, 14).unwrap(),
            Published::AlreadyStored(_)
        ));
    }
}
