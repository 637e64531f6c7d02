//! virtio-net (device type 1) on a tap interface.
//!
//! Queues: receive queue `2p` and transmit queue `2p + 1` for each pair `p`, each pair on its own tap queue, and
//! with more than one pair a control queue last (VIRTIO_NET_F_MQ needs VIRTIO_NET_F_CTRL_VQ). Until the driver sets
//! the pairs in use with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET only the first pair carries traffic; the tap queues of
//! the others are detached so the kernel does not steer frames to them.
//!
//! Offered features: VERSION_1, MAC, STATUS (the link is always up), MRG_RXBUF, and the checksum and segmentation
//! offloads the tap accepts (`TUNSETOFFLOAD`): CSUM/GUEST_CSUM, HOST_/GUEST_TSO4, TSO6, ECN and UFO. The offloads
//! the driver accepts for received frames are set on the tap on activation. Frames cross the tap with the 12-byte
//! `virtio_net_hdr_v1` the driver uses, so headers pass through unchanged once validated.
//!
//! The configuration space holds the MAC, the status and `max_virtqueue_pairs`; it is read-only.

mod ctrl;
mod handler;
mod rx;
mod tx;

use std::mem::{offset_of, size_of};
use std::sync::Arc;

use thiserror::Error;
use virtio_bindings::virtio_net::{
    virtio_net_config, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::counters::{DeviceCounters, NetCounters};
use crate::device::{
    read_config_bytes, ActivateError, GuestMemory, VirtioDevice, VirtioDeviceType, VirtioInterrupt,
    COMMON_FEATURES,
};
use crate::io_worker::{IoWorker, QueueSlot};
use crate::tap::{Tap, TapError, TapOffloads, MAX_TAP_QUEUES};
use crate::transport::MAX_QUEUES;
use ctrl::{set_active_pairs, CtrlHandler};
use handler::{NetHandler, Pair};
use tx::TxHandler;

/// Largest frame on the tap or in a chain, header included: the 12-byte header and a 65,550-byte frame (a 64 KiB
/// segmentation-offload packet with its Ethernet header).
pub const MAX_FRAME_LEN: usize = 65_562;
/// Default size of each queue.
pub const NET_DEFAULT_QUEUE_SIZE: u16 = 256;

/// How a network device is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetOptions {
    /// The tap to use (created if it does not exist); `None` creates one with a kernel-chosen name.
    pub tap: Option<String>,
    /// The guest's MAC address; `None` picks a random locally administered one.
    pub mac: Option<[u8; 6]>,
    /// Number of queues: two per queue pair (the control queue is extra).
    pub num_queues: u16,
    /// Size of each queue: a power of two from 4 to 32768.
    pub queue_size: u16,
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            tap: None,
            mac: None,
            num_queues: 2,
            queue_size: NET_DEFAULT_QUEUE_SIZE,
        }
    }
}

/// Errors creating a network device.
#[derive(Debug, Error)]
pub enum NetError {
    /// The tap cannot be opened or set up.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The queue count is odd, zero or too large.
    #[error("network device queue count {0} is invalid; use an even number from 2 to {max}", max = max_queue_count())]
    QueueCount(u16),
    /// The queue size is not a power of two in range.
    #[error("network device queue size {0} is invalid; use a power of two from 4 to 32768")]
    QueueSize(u16),
    /// The MAC is a multicast address.
    #[error("MAC address {0} is a multicast address; use a unicast MAC like 52:54:00:12:34:56")]
    MulticastMac(String),
    /// The taps given do not make one interface with one queue per pair.
    #[error("the taps given are not the queues of one interface; open them with Tap::open_queues")]
    TapMismatch,
    /// No random MAC could be made.
    #[error("cannot pick a random MAC address: {0}; give one explicitly")]
    RandomMac(#[source] std::io::Error),
}

/// Most queues a network device may ask for: a pair per tap queue, and room for the control queue.
fn max_queue_count() -> usize {
    (2 * MAX_TAP_QUEUES).min((MAX_QUEUES - 1) & !1)
}

fn format_mac(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|byte| format!("{byte:02x}")).collect();
    parts.join(":")
}

/// Refuses multicast addresses.
fn check_mac(mac: [u8; 6]) -> Result<[u8; 6], NetError> {
    if mac[0] & 1 != 0 {
        return Err(NetError::MulticastMac(format_mac(&mac)));
    }
    Ok(mac)
}

/// A random unicast, locally administered MAC.
fn random_mac() -> Result<[u8; 6], NetError> {
    let mut mac = [0u8; 6];
    let mut filled = 0;
    while filled < mac.len() {
        let rest = &mut mac[filled..];
        // SAFETY: `rest` is a live, exclusively borrowed buffer of `rest.len()` bytes; getrandom writes at most that
        // many bytes into it.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if ret < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(NetError::RandomMac(err));
            }
            continue;
        }
        // Lossless: at most 6.
        filled += ret as usize;
    }
    mac[0] = (mac[0] & !1) | 2;
    Ok(mac)
}

/// A virtio-net device.
pub struct Net {
    taps: Vec<Arc<Tap>>,
    mac: [u8; 6],
    queue_sizes: Vec<u16>,
    offloads: TapOffloads,
    avail_features: u64,
    acked_features: u64,
    config: Vec<u8>,
    counters: Arc<NetCounters>,
    worker: Option<IoWorker>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.if_name())
            .field("mac", &format_mac(&self.mac))
            .field("pairs", &self.taps.len())
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

/// The feature bits for the offloads in `offloads`, both directions.
fn offload_features(offloads: TapOffloads) -> u64 {
    let mut features = 0u64;
    let mut offer = |enabled: bool, bits: [u32; 2]| {
        if enabled {
            features |= (1 << bits[0]) | (1 << bits[1]);
        }
    };
    if offloads.csum {
        offer(true, [VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM]);
        offer(
            offloads.tso4,
            [VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_GUEST_TSO4],
        );
        offer(
            offloads.tso6,
            [VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_GUEST_TSO6],
        );
        offer(
            offloads.tso_ecn && (offloads.tso4 || offloads.tso6),
            [VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_GUEST_ECN],
        );
        offer(
            offloads.ufo,
            [VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_GUEST_UFO],
        );
    }
    features
}

/// The offloads the driver negotiated, as the device sees them (`host` true: frames the driver sends; false:
/// frames it receives). Offloads whose prerequisites were not negotiated are left out.
fn negotiated_offloads(acked: u64, host: bool) -> TapOffloads {
    let has = |host_bit: u32, guest_bit: u32| {
        let bit = if host { host_bit } else { guest_bit };
        acked & (1 << bit) != 0
    };
    let csum = has(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM);
    let tso4 = csum && has(VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_GUEST_TSO4);
    let tso6 = csum && has(VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_GUEST_TSO6);
    TapOffloads {
        csum,
        tso4,
        tso6,
        tso_ecn: (tso4 || tso6) && has(VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_GUEST_ECN),
        ufo: csum && has(VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_GUEST_UFO),
    }
}

fn build_config(mac: [u8; 6], pairs: u16) -> Vec<u8> {
    let mut config = vec![0u8; size_of::<virtio_net_config>()];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(offset_of!(virtio_net_config, mac), &mac);
    // Lossless: LINK_UP is 1.
    let status = VIRTIO_NET_S_LINK_UP as u16;
    put(offset_of!(virtio_net_config, status), &status.to_le_bytes());
    put(
        offset_of!(virtio_net_config, max_virtqueue_pairs),
        &pairs.to_le_bytes(),
    );
    config
}

impl Net {
    /// Opens the tap `options` names (or a new one), brings it up and builds the device.
    pub fn new(options: &NetOptions) -> Result<Self, NetError> {
        let pairs = Self::check_queues(options.num_queues, options.queue_size)?;
        if let Some(mac) = options.mac {
            check_mac(mac)?;
        }
        let taps = Tap::open_queues(options.tap.as_deref(), pairs)?;
        taps[0].set_up()?;
        Self::with_taps(taps, options.mac, options.queue_size)
    }

    /// Builds the device on already opened queues of one tap (from [`Tap::open_queues`]), one per queue pair.
    /// The link is left as it is.
    pub fn with_taps(
        taps: Vec<Tap>,
        mac: Option<[u8; 6]>,
        queue_size: u16,
    ) -> Result<Self, NetError> {
        let num_queues =
            u16::try_from(taps.len() * 2).map_err(|_| NetError::QueueCount(u16::MAX))?;
        let pairs = Self::check_queues(num_queues, queue_size)?;
        let multi_queue = pairs > 1;
        let Some(first) = taps.first() else {
            return Err(NetError::QueueCount(0));
        };
        if taps
            .iter()
            .any(|tap| tap.if_name() != first.if_name() || tap.is_multi_queue() != multi_queue)
        {
            return Err(NetError::TapMismatch);
        }
        let mac = match mac {
            Some(mac) => check_mac(mac)?,
            None => random_mac()?,
        };
        let offloads = first.supported_offloads();
        let mut features = COMMON_FEATURES
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | offload_features(offloads);
        let mut queue_count = 2 * pairs;
        if multi_queue {
            features |= (1 << VIRTIO_NET_F_MQ) | (1 << VIRTIO_NET_F_CTRL_VQ);
            queue_count += 1;
        }
        // Lossless: pairs is at most MAX_TAP_QUEUES.
        let config = build_config(mac, pairs as u16);
        Ok(Self {
            taps: taps.into_iter().map(Arc::new).collect(),
            mac,
            queue_sizes: vec![queue_size; queue_count],
            offloads,
            avail_features: features,
            acked_features: 0,
            config,
            counters: Arc::default(),
            worker: None,
        })
    }

    /// Validates the queue setup; returns the number of pairs.
    fn check_queues(num_queues: u16, queue_size: u16) -> Result<usize, NetError> {
        let count = usize::from(num_queues);
        if count == 0 || count % 2 != 0 || count > max_queue_count() {
            return Err(NetError::QueueCount(num_queues));
        }
        if !queue_size.is_power_of_two() || !(4..=32768).contains(&queue_size) {
            return Err(NetError::QueueSize(queue_size));
        }
        Ok(count / 2)
    }

    /// The tap interface name.
    pub fn if_name(&self) -> &str {
        self.taps.first().map_or("", |tap| tap.if_name())
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The offloads the tap accepts (and the device offers).
    pub fn offloads(&self) -> TapOffloads {
        self.offloads
    }

    fn has(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// Sorts the enabled queues into pairs and the control queue, by the negotiated layout.
    fn assign_queues(
        &self,
        queues: Vec<(usize, Queue, EventFd)>,
    ) -> Result<(Vec<Pair>, Option<QueueSlot>), ActivateError> {
        let pairs_in_use = if self.has(VIRTIO_NET_F_MQ) {
            self.taps.len()
        } else {
            1
        };
        let ctrl_index = self.has(VIRTIO_NET_F_CTRL_VQ).then_some(2 * pairs_in_use);
        let mut slots: Vec<[Option<QueueSlot>; 2]> =
            self.taps.iter().map(|_| [None, None]).collect();
        let mut ctrl = None;
        if queues.is_empty() {
            return Err(ActivateError::BadQueues(
                "virtio-net needs at least one queue".into(),
            ));
        }
        for (index, queue, event) in queues {
            let slot = QueueSlot::new(index, queue, event);
            if Some(index) == ctrl_index {
                ctrl = Some(slot);
            } else if index < 2 * pairs_in_use {
                slots[index / 2][index % 2] = Some(slot);
            } else {
                return Err(ActivateError::BadQueues(format!(
                    "virtio-net has no queue {index} with the negotiated features"
                )));
            }
        }
        let pairs = self
            .taps
            .iter()
            .zip(slots)
            .map(|(tap, [rx, tx])| Pair::new(tap.clone(), rx, tx))
            .collect();
        Ok((pairs, ctrl))
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> VirtioDeviceType {
        VirtioDeviceType::Net
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only for a virtio 1.x driver.
        tracing::debug!(
            offset,
            len = data.len(),
            "dropping a virtio-net config write"
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
        let (pairs, ctrl) = self.assign_queues(queues)?;
        let accepted = negotiated_offloads(self.acked_features, false);
        if let Err(err) = self.taps[0].set_offloads(accepted) {
            // The kernel then finishes checksums and segments itself: slower, still correct.
            tracing::warn!(%err, "cannot give the tap the driver's receive offloads");
        }
        // Only the first pair carries traffic until the driver asks for more.
        if let Err(err) = set_active_pairs(&self.taps, 1) {
            tracing::warn!(%err, "cannot detach the tap queues of unused pairs");
        }
        let handler = NetHandler {
            mem,
            interrupt,
            pairs,
            ctrl,
            ctrl_handler: CtrlHandler::new(self.taps.clone(), self.has(VIRTIO_NET_F_MQ)),
            tx: TxHandler::new(
                self.taps.clone(),
                negotiated_offloads(self.acked_features, true),
                self.counters.clone(),
            ),
            mergeable: self.has(VIRTIO_NET_F_MRG_RXBUF),
            accepted,
            counters: self.counters.clone(),
        };
        self.worker = Some(IoWorker::spawn("virtio-net", handler)?);
        Ok(())
    }

    fn reset(&mut self) -> Option<Vec<(usize, EventFd)>> {
        self.worker.take().map(IoWorker::stop)
    }

    fn counters(&self) -> Option<Arc<dyn DeviceCounters>> {
        Some(self.counters.clone())
    }
}

#[cfg(test)]
#[path = "net/net_tests.rs"]
mod tests;
