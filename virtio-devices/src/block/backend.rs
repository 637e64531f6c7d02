//! Disk image backends: the [`DiskBackend`] trait the block device works through, and [`RawFile`], a raw image (or
//! host block device) accessed with positional reads and writes, straight to and from guest memory.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_memory::VolatileSlice;

use super::lock::{lock_file, LockKind, LockOutcome};

/// A disk image as the block device sees it: a byte-addressed store of a fixed size. Implementations must be safe
/// to call from several queue threads at once.
pub trait DiskBackend: Send + Sync {
    /// Size of the disk in bytes.
    fn size(&self) -> u64;

    /// Whether the image was opened read-only.
    fn is_read_only(&self) -> bool;

    /// Fills `buf` from the disk at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes `buf` to the disk at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;

    /// Deallocates `len` bytes at `offset`; afterwards they read as zero. A backend that cannot deallocate may do
    /// nothing (discard is a hint).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Zeroes `len` bytes at `offset`, deallocating them when `unmap` allows it.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;

    /// A descriptor on which byte `n` of the disk is byte `n` of the file, opened for writing unless the disk is
    /// read-only, so the block device can read, write and flush it asynchronously (io_uring) itself. `None`, the
    /// default, for formats that translate addresses: they are served synchronously through the methods here.
    fn direct_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Fills the guest buffer `buf` from the disk at `offset`. The default reads chunks of at most 1 MiB into
    /// `scratch` with [`DiskBackend::read_at`] and copies them; a backend that can read straight into guest memory
    /// overrides it. `scratch` belongs to the caller, so it is allocated once, not per request.
    fn read_to_guest(
        &self,
        buf: &VolatileSlice<'_>,
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        bounce_chunks(buf, offset, scratch, |chunk, bounce, at| {
            self.read_at(bounce, at)?;
            chunk.copy_from(bounce);
            Ok(())
        })
    }

    /// Writes the guest buffer `buf` to the disk at `offset`; the counterpart of [`DiskBackend::read_to_guest`].
    fn write_from_guest(
        &self,
        buf: &VolatileSlice<'_>,
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        bounce_chunks(buf, offset, scratch, |chunk, bounce, at| {
            chunk.copy_to(bounce);
            self.write_at(bounce, at)
        })
    }
}

/// Largest chunk the default guest-memory methods of [`DiskBackend`] move through their scratch buffer.
pub(crate) const BOUNCE_CHUNK: usize = 1 << 20;

/// Calls `f` with each chunk of at most [`BOUNCE_CHUNK`] bytes of `buf`, a scratch slice of the same length and the
/// chunk's disk offset.
fn bounce_chunks(
    buf: &VolatileSlice<'_>,
    offset: u64,
    scratch: &mut Vec<u8>,
    mut f: impl FnMut(&VolatileSlice<'_>, &mut [u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let len = (buf.len() - done).min(BOUNCE_CHUNK);
        if scratch.len() < len {
            scratch.resize(len, 0);
        }
        let chunk = buf.subslice(done, len).map_err(io::Error::other)?;
        f(&chunk, &mut scratch[..len], disk_offset(offset, done)?)?;
        done += len;
    }
    Ok(())
}

/// `offset + done`, refused when it overflows.
fn disk_offset(offset: u64, done: usize) -> io::Result<u64> {
    offset
        .checked_add(done as u64)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Errors opening a disk image.
#[derive(Debug, Error)]
pub enum DiskError {
    /// The image cannot be opened.
    #[error("failed to open disk image {path}: {source}; check the path and its permissions")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// Another process (or another device in this one) holds a conflicting lock.
    #[error("disk image {path} is locked by another user (is another VM using it?); stop that user or open the image read-only in both")]
    Locked {
        /// The image.
        path: PathBuf,
    },
    /// Locking failed for another reason.
    #[error("failed to lock disk image {path}: {source}; check that its file system supports file locks")]
    Lock {
        /// The image.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// The size cannot be determined.
    #[error("failed to find the size of disk image {path}: {source}")]
    Size {
        /// The image.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// The image format is not supported or the image is damaged.
    #[error("disk image {path} cannot be used: {reason}")]
    Format {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Opens `path` read-write or read-only and takes the matching whole-file lock.
pub(crate) fn open_locked(path: &Path, read_only: bool) -> Result<File, DiskError> {
    let file = File::options()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let kind = if read_only {
        LockKind::Shared
    } else {
        LockKind::Exclusive
    };
    match lock_file(&file, kind) {
        Ok(LockOutcome::Locked) => Ok(file),
        Ok(LockOutcome::Conflict) => Err(DiskError::Locked {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(DiskError::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A raw disk image: byte `n` of the disk is byte `n` of the file. The size is the file's size when opened; a block
/// device works as well as a regular file.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
    read_only: bool,
}

/// Largest chunk zeroed with explicit writes when the file system cannot zero ranges itself.
const ZERO_CHUNK: u64 = 1 << 20;

impl RawFile {
    /// Opens and locks a raw image (exclusively for read-write, shared for read-only).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let mut file = open_locked(path, read_only)?;
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            file,
            size,
            read_only,
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        loop {
            // SAFETY: fallocate only operates on the open descriptor; no memory is passed.
            let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Runs `op` (a `pread` or `pwrite` of `len` bytes from `done` into `buf`, at a file offset) until all of `buf` is
    /// transferred. A transfer of 0 bytes means the file ended.
    fn transfer_all(
        &self,
        buf: &VolatileSlice<'_>,
        offset: u64,
        mut op: impl FnMut(libc::c_int, usize, usize, libc::off_t) -> isize,
    ) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = libc::off_t::try_from(disk_offset(offset, done)?)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let ret = op(self.file.as_raw_fd(), done, buf.len() - done, at);
            match usize::try_from(ret) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(count) => done += count,
                Err(_) => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
        Ok(())
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let chunk = (len - done).min(ZERO_CHUNK) as usize;
            self.file.write_all_at(&zeroes[..chunk], offset + done)?;
            done += chunk as u64;
        }
        Ok(())
    }
}

/// Whether a fallocate error means the file system (or device) does not support the operation.
fn unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENODEV)
    )
}

impl DiskBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn direct_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(err) if unsupported(&err) => Ok(()),
            other => other,
        }
    }

    fn read_to_guest(
        &self,
        buf: &VolatileSlice<'_>,
        offset: u64,
        _scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let guard = buf.ptr_guard_mut();
        let base = guard.as_ptr();
        self.transfer_all(buf, offset, |fd, done, len, at| {
            // SAFETY: `base` is the start of the `buf.len()` bytes of mapped guest memory `buf` covers, kept mapped
            // by `guard`; `done + len <= buf.len()`, so pread writes only inside it. Guest memory is only ever
            // accessed through raw pointers and volatile copies, so no Rust reference aliases these bytes.
            unsafe { libc::pread(fd, base.add(done).cast(), len, at) }
        })
    }

    fn write_from_guest(
        &self,
        buf: &VolatileSlice<'_>,
        offset: u64,
        _scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let guard = buf.ptr_guard();
        let base = guard.as_ptr();
        self.transfer_all(buf, offset, |fd, done, len, at| {
            // SAFETY: `base` is the start of the `buf.len()` bytes of mapped guest memory `buf` covers, kept mapped
            // by `guard`; `done + len <= buf.len()`, so pwrite reads only inside it.
            unsafe { libc::pwrite(fd, base.add(done).cast(), len, at) }
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(err) if unsupported(&err) => {}
                other => return other,
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(err) if unsupported(&err) => self.write_zero_bytes(offset, len),
            other => other,
        }
    }
}
