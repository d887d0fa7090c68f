//! The spool's files are the daemon's alone: batches of every tenant sit in them, acked,
//! and whoever can write there can make the daemon replay anything. So:
//!
//! - directories (`spool.dir`, `rejected/`) are created 0700, must belong to the user the
//!   daemon runs as, and an existing one with group or other permission bits is tightened
//!   to 0700 (logged) rather than refused — a mode is a mistake the daemon can fix itself,
//!   an owner is not ([`check_dir`]);
//! - files are created 0600;
//! - `LOCK` and `rejected/reasons.jsonl`, the two files opened by a fixed name that may
//!   already exist, are opened with `O_NOFOLLOW`: a symbolic link planted there is refused
//!   with an error naming it, never followed (segment files are created with `O_EXCL`,
//!   which refuses an existing link as well, and listed only when they are regular files;
//!   `rejected/` itself must not be a link).
//!
//! `spool.dir` itself may be a symbolic link: that is the operator's configuration.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use tracing::warn;

/// Mode of the spool's directories.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the spool's files.
pub const FILE_MODE: u32 = 0o600;

/// What to do about an existing directory, from its owner and mode ([`check_dir`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirVerdict {
    /// Owned by us, no group or other bits: fine.
    Fine,
    /// Owned by us with group or other bits: chmod it to [`DIR_MODE`].
    Tighten,
    /// Owned by someone else: refuse, with why.
    Refuse(String),
}

/// Decides about a directory owned by `owner` with permission bits `mode`, for a process
/// whose effective uid is `euid`.
pub fn check_dir(owner: u32, mode: u32, euid: u32) -> DirVerdict {
    if owner != euid {
        return DirVerdict::Refuse(format!(
            "belongs to uid {owner}, not to the uid dbx runs as ({euid}); another user could \
             change the spool's files: give it to uid {euid} (chown) or choose another spool.dir"
        ));
    }
    if mode & 0o077 != 0 {
        DirVerdict::Tighten
    } else {
        DirVerdict::Fine
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates `dir` (and missing parents) with mode 0700, or checks an existing one:
/// refused unless it is a directory owned by us; group and other bits are removed.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let mode = meta.mode() & 0o7777;
    match check_dir(meta.uid(), mode, euid()) {
        DirVerdict::Fine => Ok(()),
        DirVerdict::Tighten => {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))?;
            warn!(
                dir = %dir.display(),
                was = format!("{mode:04o}"),
                "spool directory was accessible to other users; its mode is now 0700"
            );
            Ok(())
        }
        DirVerdict::Refuse(why) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} {why}", dir.display()),
        )),
    }
}

/// Refuses `path` when it is a symbolic link (fine when it does not exist).
pub fn not_a_symlink(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(symlink_refused(path)),
        _ => Ok(()),
    }
}

/// [`private_dir`] for a directory inside the spool, which must not be a symbolic link.
pub fn private_subdir(dir: &Path) -> io::Result<()> {
    not_a_symlink(dir)?;
    private_dir(dir)
}

fn symlink_refused(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{} is a symbolic link; refusing to follow it (remove it: the spool creates its own)",
            path.display()
        ),
    )
}

/// Opens `path` with `opts` plus `O_NOFOLLOW` (created 0600): a symbolic link there is
/// refused with an error naming it.
pub fn open_nofollow(opts: &mut OpenOptions, path: &Path) -> io::Result<File> {
    opts.custom_flags(libc::O_NOFOLLOW)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                symlink_refused(path)
            } else {
                e
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_checked_and_loose_modes_tightened() {
        assert_eq!(check_dir(1000, 0o700, 1000), DirVerdict::Fine);
        assert_eq!(check_dir(1000, 0o755, 1000), DirVerdict::Tighten);
        assert_eq!(check_dir(1000, 0o1777, 1000), DirVerdict::Tighten);
        match check_dir(0, 0o700, 1000) {
            DirVerdict::Refuse(why) => assert!(why.contains("uid 0") && why.contains("(1000)")),
            other => panic!("{other:?}"),
        }
    }
}
