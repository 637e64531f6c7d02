//! virtio-vsock (device type 19, virtio 1.2 §5.10) with its host side on Unix sockets.
//!
//! Queues: receive (0), transmit (1) and event (2). Only stream sockets are offered (VIRTIO_VSOCK_F_STREAM, no
//! SEQPACKET); the configuration space is the guest's CID (a little-endian u64, read-only).
//!
//! Host side, as Firecracker and Cloud Hypervisor users expect: a guest connecting to host (CID 2) port `N`
//! reaches the Unix socket `<socket>_N`; a host program connects to `<socket>`, writes `CONNECT <guest port>\n`,
//! reads `OK <host port>\n` once the guest accepted, and then talks to the guest. A guest that refuses gets the
//! program's connection closed. Flow control follows the guest's credit in both directions; see `conn`.

mod conn;
mod handler;
mod muxer;
mod packet;
mod poll;
mod unix;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::counters::{DeviceCounters, VsockCounters};
use crate::device::{
    read_config_bytes, ActivateError, GuestMemory, VirtioDevice, VirtioDeviceType, VirtioInterrupt,
    COMMON_FEATURES,
};
use crate::io_worker::{IoWorker, QueueSlot};
use handler::{VsockHandler, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use muxer::Muxer;

/// Receive buffer space the device gives the guest per connection (its `buf_alloc`); guest data the host
/// socket has not taken is buffered up to this much.
pub const VSOCK_CONN_BUF_SIZE: u32 = 64 * 1024;
/// Most connections at a time; more are refused with RST (guest) or closed (host).
pub const VSOCK_MAX_CONNECTIONS: usize = 1024;
/// First host port handed out to host-initiated connections (then upward, unique among live connections).
pub const VSOCK_FIRST_HOST_PORT: u32 = 1024;
/// Size of each queue.
pub const VSOCK_QUEUE_SIZE: u16 = 256;
/// Stream sockets (virtio 1.2 §5.10.3).
const VIRTIO_VSOCK_F_STREAM: u32 = 0;
/// Largest CID a guest can have: 0xffff_ffff is VMADDR_CID_ANY and the upper 32 bits are reserved.
const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Errors creating a vsock device.
#[derive(Debug, Error)]
pub enum VsockError {
    /// The CID is one of the well-known ones.
    #[error("cid {cid} is {owner}; use 3 or more")]
    ReservedCid {
        /// The CID given.
        cid: u64,
        /// Whose it is.
        owner: &'static str,
    },
    /// The CID does not fit the 32 bits guests use.
    #[error("cid {0} is out of range; use 3 to {MAX_GUEST_CID}")]
    CidOutOfRange(u64),
    /// The socket path is too long for a Unix socket address once `_<port>` is appended.
    #[error("vsock socket path {} is too long for a Unix socket (with `_<port>` appended); use a shorter path", .0.display())]
    PathTooLong(PathBuf),
    /// Something other than a socket is at the socket path.
    #[error("vsock socket path {} is in use by {kind}; remove it or choose another path", path.display())]
    PathInUse {
        /// The path.
        path: PathBuf,
        /// What is there.
        kind: &'static str,
    },
    /// A stale socket file cannot be removed.
    #[error("cannot remove the stale vsock socket {}: {source}; remove it by hand or choose another path", path.display())]
    RemoveStale {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Listening on the socket path failed.
    #[error("cannot listen on vsock socket {}: {source}; check that its directory exists and is writable", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    acked_features: u64,
    counters: Arc<VsockCounters>,
    worker: Option<IoWorker>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("socket", &self.socket)
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device giving the guest CID `guest_cid`, listening for host programs on `socket` (a stale socket file
    /// there is replaced). Guest connections to host port `N` go to `<socket>_N`.
    pub fn new(guest_cid: u64, socket: &Path) -> Result<Self, VsockError> {
        let owner = match guest_cid {
            0 => Some("reserved for the hypervisor"),
            1 => Some("the loopback address"),
            2 => Some("the host's"),
            _ => None,
        };
        if let Some(owner) = owner {
            return Err(VsockError::ReservedCid {
                cid: guest_cid,
                owner,
            });
        }
        if guest_cid > MAX_GUEST_CID {
            return Err(VsockError::CidOutOfRange(guest_cid));
        }
        let listener = unix::listen(socket)?;
        Ok(Self {
            guest_cid,
            socket: socket.to_path_buf(),
            listener,
            acked_features: 0,
            counters: Arc::default(),
            worker: None,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The socket host programs connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> VirtioDeviceType {
        VirtioDeviceType::Vsock
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[VSOCK_QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES | (1 << VIRTIO_VSOCK_F_STREAM)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "dropping a write to the read-only virtio-vsock config"
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
        let (mut rx, mut tx, mut event) = (None, None, None);
        for (index, queue, queue_event) in queues {
            let slot = Some(QueueSlot::new(index, queue, queue_event));
            match index {
                RX_QUEUE => rx = slot,
                TX_QUEUE => tx = slot,
                EVENT_QUEUE => event = slot,
                _ => {
                    return Err(ActivateError::BadQueues(format!(
                        "virtio-vsock has no queue {index}; it has queues 0 to 2"
                    )))
                }
            }
        }
        if rx.is_none() || tx.is_none() {
            return Err(ActivateError::BadQueues(
                "virtio-vsock needs its receive and transmit queues (0 and 1)".into(),
            ));
        }
        let listener = self.listener.try_clone().map_err(ActivateError::Worker)?;
        let muxer = Muxer::new(
            self.guest_cid,
            self.socket.clone(),
            listener,
            self.counters.clone(),
        )
        .map_err(ActivateError::Worker)?;
        let handler = VsockHandler {
            mem,
            interrupt,
            rx,
            tx,
            event,
            muxer,
        };
        self.worker = Some(IoWorker::spawn("virtio-vsock", handler)?);
        Ok(())
    }

    fn reset(&mut self) -> Option<Vec<(usize, EventFd)>> {
        self.worker.take().map(IoWorker::stop)
    }

    fn counters(&self) -> Option<Arc<dyn DeviceCounters>> {
        Some(self.counters.clone())
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        unix::remove_socket(&self.socket);
    }
}

#[cfg(test)]
mod tests;
