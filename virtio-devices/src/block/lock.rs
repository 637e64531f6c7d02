//! Whole-file advisory locks on disk images, so two VMs cannot open one image read-write.
//!
//! Open file description (OFD) locks (`F_OFD_SETLK`) belong to the open file, not the process: two opens in the same
//! process conflict just as two processes do, and the lock goes away when the file is closed. A read-write open takes
//! a write lock over the whole file, a read-only open a read lock, so any number of read-only users can share an
//! image but a writer excludes everyone.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Kind of lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockKind {
    /// Readers share it.
    Shared,
    /// Excludes everyone else.
    Exclusive,
}

/// What happened when locking.
#[derive(Debug)]
pub(crate) enum LockOutcome {
    /// The lock is held.
    Locked,
    /// Someone else holds a conflicting lock.
    Conflict,
}

/// Takes a whole-file OFD lock without waiting.
pub(crate) fn lock_file(file: &File, kind: LockKind) -> io::Result<LockOutcome> {
    let lock_type = match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    };
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value (whole file from offset 0, pid 0 as
    // OFD locks require).
    let mut request: libc::flock = unsafe { std::mem::zeroed() };
    request.l_type = lock_type as libc::c_short;
    request.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: the descriptor is open for the lifetime of `file`, and `request` is a valid `flock` the kernel only
    // reads during the call.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &request) };
    if ret == 0 {
        return Ok(LockOutcome::Locked);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(LockOutcome::Conflict),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    fn reopen(file: &TempFile) -> File {
        File::options()
            .read(true)
            .write(true)
            .open(file.as_path())
            .unwrap()
    }

    #[test]
    fn writers_exclude_everyone_and_readers_share() {
        let image = TempFile::new().unwrap();
        let first = reopen(&image);
        assert!(matches!(
            lock_file(&first, LockKind::Exclusive).unwrap(),
            LockOutcome::Locked
        ));
        let second = reopen(&image);
        assert!(matches!(
            lock_file(&second, LockKind::Exclusive).unwrap(),
            LockOutcome::Conflict
        ));
        assert!(matches!(
            lock_file(&second, LockKind::Shared).unwrap(),
            LockOutcome::Conflict
        ));
        drop(first);
        // Other tests in this process fork children (qemu-img); a child briefly holds a copy of every descriptor
        // until its exec closes them, so the closed lock may take a moment to be released. Poll, bounded.
        let mut outcome = lock_file(&second, LockKind::Shared).unwrap();
        for _ in 0..500 {
            if matches!(outcome, LockOutcome::Locked) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            outcome = lock_file(&second, LockKind::Shared).unwrap();
        }
        assert!(matches!(outcome, LockOutcome::Locked));
        let third = reopen(&image);
        assert!(matches!(
            lock_file(&third, LockKind::Shared).unwrap(),
            LockOutcome::Locked
        ));
        assert!(matches!(
            lock_file(&reopen(&image), LockKind::Exclusive).unwrap(),
            LockOutcome::Conflict
        ));
    }
}
