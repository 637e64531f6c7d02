//! qcow2 images through the `imago` crate (synchronous build, no async runtime).
//!
//! The image file is opened and locked here exactly like a raw image, then handed to imago. Backing files and
//! external data files are refused: their paths come from the image header, which whoever controls the image (the
//! guest, for a writable image) can rewrite, so following them would let an image name any host file.
//!
//! Reads and writes share the image; discards take it exclusively, because imago may drop cluster mappings that
//! concurrent requests are using.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate,
    StorageOpenOptions,
};

use super::backend::{open_locked, DiskBackend, DiskError};

/// A qcow2 image.
pub struct Qcow2File {
    image: RwLock<FormatAccess<ImagoFile>>,
    size: u64,
    read_only: bool,
    path: PathBuf,
}

impl std::fmt::Debug for Qcow2File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2File")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Qcow2File {
    /// Opens and locks a qcow2 image (exclusively for read-write, shared for read-only). Backing files and external
    /// data files are refused.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        Self::open_inner(path, read_only, false)
    }

    /// Like [`Qcow2File::open`], but also opens the backing chain the image header names (read-only). Only for
    /// images whose format the operator stated: a header that came from a guest (a raw image probed as qcow2) must
    /// never make the VMM open host files.
    pub fn open_with_backing(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        Self::open_inner(path, read_only, true)
    }

    fn open_inner(path: &Path, read_only: bool, backing: bool) -> Result<Self, DiskError> {
        let file = open_locked(path, read_only)?;
        let format_error = |err: io::Error| DiskError::Format {
            path: path.to_path_buf(),
            reason: err.to_string(),
        };
        let options = StorageOpenOptions::new().filename(path).write(!read_only);
        let storage = ImagoFile::from_open_file(file, options).map_err(format_error)?;
        let builder = Qcow2::<ImagoFile>::builder(storage).write(!read_only);
        let opened = if backing {
            builder.open(PermissiveImplicitOpenGate::default())
        } else {
            builder.open(DenyImplicitOpenGate::default())
        };
        let qcow2 = opened.map_err(|err| DiskError::Format {
                path: path.to_path_buf(),
                reason: if backing {
                    format!("not a usable qcow2 image: {err}")
                } else {
                    format!(
                        "not a usable qcow2 image: {err} (an image with a backing file needs an explicit format=qcow2)"
                    )
                },
            })?;
        let image = FormatAccess::new(qcow2);
        let size = image.size();
        Ok(Self {
            image: RwLock::new(image),
            size,
            read_only,
            path: path.to_path_buf(),
        })
    }

    fn shared(&self) -> RwLockReadGuard<'_, FormatAccess<ImagoFile>> {
        self.image
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, FormatAccess<ImagoFile>> {
        self.image
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks that `len` bytes at `offset` are inside the disk (imago would zero-fill reads past the end).
    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "access {offset:#x}+{len:#x} is past the end of {}",
                    self.path.display()
                ),
            )),
        }
    }
}

impl DiskBackend for Qcow2File {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.shared().read(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.shared().write(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        let image = self.shared();
        image.flush()?;
        image.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        self.exclusive().discard_to_zero(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_range(offset, len)?;
        if unmap {
            self.exclusive().discard_to_zero(offset, len)
        } else {
            self.shared().write_zeroes(offset, len)
        }
    }
}

#[cfg(test)]
#[path = "qcow2_tests.rs"]
mod tests;
