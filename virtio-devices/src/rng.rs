//! virtio-rng (device type 4): one request queue whose device-writable buffers the device fills with random bytes.
//!
//! Bytes come from the kernel's `getrandom(2)` by default, or from a file (a character device such as
//! `/dev/hwrng`, or a regular file for reproducible tests). Every chain is checked before anything is written: a
//! chain that is malformed, contains a driver-readable descriptor or points outside guest memory is returned with a
//! used length of 0. At most [`MAX_BYTES_PER_REQUEST`] bytes are produced per request, which the specification
//! allows ("the device MAY use less than the entire buffer").

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::chain::descriptors;
use crate::counters::{DeviceCounters, RngCounters};
use crate::device::{
    read_config_bytes, ActivateError, GuestMemory, GuestMemoryMmap, VirtioDevice, VirtioDeviceType,
    VirtioInterrupt, COMMON_FEATURES,
};
use crate::worker::{ChainHandler, Worker};

/// Size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Most random bytes produced for one request.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// Where random bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RngSource {
    /// The kernel's `getrandom(2)`.
    Getrandom,
    /// Bytes read from this file.
    File(PathBuf),
}

/// Errors creating a virtio-rng device.
#[derive(Debug, Error)]
pub enum RngError {
    /// The source file cannot be opened.
    #[error("failed to open entropy source {path}: {source}; check that the file exists and is readable")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
}

/// An opened source of random bytes.
#[derive(Clone, Debug)]
enum Entropy {
    Getrandom,
    File(Arc<File>),
}

impl Entropy {
    /// Fills as much of `buf` as the source can; returns the number of bytes filled.
    fn fill(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Getrandom => getrandom(buf).map(|()| buf.len()),
            Self::File(file) => {
                let mut filled = 0;
                while filled < buf.len() {
                    match (&**file).read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(count) => filled += count,
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                        Err(err) if filled > 0 => {
                            tracing::warn!(%err, "entropy source read failed");
                            break;
                        }
                        Err(err) => return Err(err),
                    }
                }
                Ok(filled)
            }
        }
    }
}

/// Fills `buf` from `getrandom(2)`.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a live, exclusively borrowed buffer of `rest.len()` bytes; getrandom writes at most that
        // many bytes into it and keeps no reference after returning.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += ret as usize;
    }
    Ok(())
}

/// Serves the request queue.
struct RngHandler {
    entropy: Entropy,
    buf: Vec<u8>,
    counters: Arc<RngCounters>,
}

impl RngHandler {
    fn new(entropy: Entropy, counters: Arc<RngCounters>) -> Self {
        Self {
            entropy,
            buf: vec![0; MAX_BYTES_PER_REQUEST],
            counters,
        }
    }
}

impl ChainHandler for RngHandler {
    fn handle_chain(
        &mut self,
        _queue_index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let descs = match descriptors(chain) {
            Ok(descs) => descs,
            Err(err) => {
                tracing::debug!(%err, "skipping a virtio-rng request");
                return 0;
            }
        };
        if descs.iter().any(|desc| !desc.is_write_only()) {
            tracing::debug!("skipping a virtio-rng request with a driver-readable buffer");
            return 0;
        }
        if let Some(desc) = descs
            .iter()
            .find(|desc| !mem.check_range(desc.addr(), desc.len() as usize))
        {
            tracing::debug!(
                addr = desc.addr().0,
                len = desc.len(),
                "skipping a virtio-rng buffer outside guest memory"
            );
            return 0;
        }
        let mut written = 0usize;
        for desc in &descs {
            let want = (desc.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
            if want == 0 {
                break;
            }
            let got = match self.entropy.fill(&mut self.buf[..want]) {
                Ok(got) => got,
                Err(err) => {
                    tracing::warn!(%err, "failed to read random bytes");
                    break;
                }
            };
            if let Err(err) = mem.write_slice(&self.buf[..got], desc.addr()) {
                tracing::warn!(%err, "failed to write random bytes to guest memory");
                break;
            }
            written += got;
            if got < want {
                break;
            }
        }
        self.counters.bytes.add(written as u64);
        // Lossless: at most MAX_BYTES_PER_REQUEST.
        written as u32
    }
}

/// A virtio-rng device.
pub struct Rng {
    entropy: Entropy,
    acked_features: u64,
    counters: Arc<RngCounters>,
    worker: Option<Worker>,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("entropy", &self.entropy)
            .field("active", &self.worker.is_some())
            .finish()
    }
}

impl Rng {
    /// A device drawing bytes from `source` (a file source is opened now).
    pub fn new(source: &RngSource) -> Result<Self, RngError> {
        let entropy = match source {
            RngSource::Getrandom => Entropy::Getrandom,
            RngSource::File(path) => Entropy::File(Arc::new(open_source(path)?)),
        };
        Ok(Self {
            entropy,
            acked_features: 0,
            counters: Arc::default(),
            worker: None,
        })
    }
}

fn open_source(path: &Path) -> Result<File, RngError> {
    File::open(path).map_err(|source| RngError::Open {
        path: path.to_path_buf(),
        source,
    })
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> VirtioDeviceType {
        VirtioDeviceType::Rng
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space: everything reads as zero.
        read_config_bytes(&[], offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "dropping a virtio-rng config write"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<(usize, Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != 1 || queues[0].0 != 0 {
            return Err(ActivateError::BadQueues(
                "virtio-rng needs exactly its request queue (0)".into(),
            ));
        }
        let handler = RngHandler::new(self.entropy.clone(), self.counters.clone());
        self.worker = Some(Worker::spawn(
            "virtio-rng",
            handler,
            mem,
            interrupt,
            queues,
        )?);
        Ok(())
    }

    fn reset(&mut self) -> Option<Vec<(usize, EventFd)>> {
        self.worker.take().map(Worker::stop)
    }

    fn counters(&self) -> Option<Arc<dyn DeviceCounters>> {
        Some(self.counters.clone())
    }
}

#[cfg(test)]
#[path = "rng_tests.rs"]
mod tests;
