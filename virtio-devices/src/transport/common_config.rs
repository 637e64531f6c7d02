//! The common configuration structure (virtio 1.2 §4.1.4.3): feature negotiation, device status and the queue
//! registers, with every driver write validated.
//!
//! Each field must be accessed at its own width; 64-bit fields may also be accessed as two 32-bit halves. Other
//! accesses read as zero and are dropped. Queue registers of a queue that does not exist (`queue_select` out of
//! range) read as zero, as the specification says for unavailable queues, and drop writes. A queue's registers are
//! frozen once it is enabled or the driver has set DRIVER_OK. Enabling a queue whose size or rings are invalid asks
//! for DEVICE_NEEDS_RESET instead of enabling it.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::interrupt::InterruptVectors;
use crate::device::GuestMemoryMmap;

/// Length of the common configuration structure (up to and including `queue_device`).
pub(crate) const COMMON_CONFIG_LEN: u32 = 0x38;

/// Device status bits, as bytes.
pub(crate) const STATUS_ACKNOWLEDGE: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
pub(crate) const STATUS_DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
pub(crate) const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
pub(crate) const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
pub(crate) const STATUS_FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;
pub(crate) const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
/// The status bits a driver may set.
const DRIVER_STATUS_BITS: u8 =
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED;

/// Required alignment of the descriptor table, available ring and used ring (virtio 1.2 §2.7).
const DESC_ALIGN: u64 = 16;
const AVAIL_ALIGN: u64 = 2;
const USED_ALIGN: u64 = 4;

/// A field of the common configuration structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    DeviceFeatureSelect,
    DeviceFeature,
    DriverFeatureSelect,
    DriverFeature,
    MsixConfig,
    NumQueues,
    DeviceStatus,
    ConfigGeneration,
    QueueSelect,
    QueueSize,
    QueueMsixVector,
    QueueEnable,
    QueueNotifyOff,
    QueueDesc,
    QueueDriver,
    QueueDevice,
}

/// The part of a field an access covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Whole,
    Low,
    High,
}

/// (offset, width, field) of every field.
const FIELDS: [(u64, usize, Field); 16] = [
    (0x00, 4, Field::DeviceFeatureSelect),
    (0x04, 4, Field::DeviceFeature),
    (0x08, 4, Field::DriverFeatureSelect),
    (0x0c, 4, Field::DriverFeature),
    (0x10, 2, Field::MsixConfig),
    (0x12, 2, Field::NumQueues),
    (0x14, 1, Field::DeviceStatus),
    (0x15, 1, Field::ConfigGeneration),
    (0x16, 2, Field::QueueSelect),
    (0x18, 2, Field::QueueSize),
    (0x1a, 2, Field::QueueMsixVector),
    (0x1c, 2, Field::QueueEnable),
    (0x1e, 2, Field::QueueNotifyOff),
    (0x20, 8, Field::QueueDesc),
    (0x28, 8, Field::QueueDriver),
    (0x30, 8, Field::QueueDevice),
];

/// The field and part an access of `len` bytes at `offset` covers, if it is a valid access.
fn decode(offset: u64, len: usize) -> Option<(Field, Part)> {
    FIELDS.iter().find_map(|&(start, width, field)| {
        if width == 8 {
            match (offset.checked_sub(start)?, len) {
                (0, 8) => Some((field, Part::Whole)),
                (0, 4) => Some((field, Part::Low)),
                (4, 4) => Some((field, Part::High)),
                _ => None,
            }
        } else {
            (offset == start && len == width).then_some((field, Part::Whole))
        }
    })
}

/// Replaces the low or high half of `old` with `value`.
fn set_part(old: u64, part: Part, value: u64) -> u64 {
    match part {
        Part::Whole => value,
        Part::Low => (old & !0xffff_ffff) | (value & 0xffff_ffff),
        Part::High => (old & 0xffff_ffff) | (value << 32),
    }
}

/// The low or high half of `value`.
fn get_part(value: u64, part: Part) -> u64 {
    match part {
        Part::Whole => value,
        Part::Low => value & 0xffff_ffff,
        Part::High => value >> 32,
    }
}

/// Why a queue cannot be enabled.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum QueueConfigError {
    /// The size is 0, not a power of two, or above the maximum.
    #[error("queue {index} size {size} is invalid; use a power of two from 1 to {max}")]
    Size {
        /// Queue index.
        index: usize,
        /// Size the driver wrote.
        size: u16,
        /// The queue's maximum size.
        max: u16,
    },
    /// A ring is not aligned as the specification requires.
    #[error("queue {index} {ring} address {addr:#x} is not {align}-byte aligned; align the ring")]
    Misaligned {
        /// Queue index.
        index: usize,
        /// Which ring.
        ring: &'static str,
        /// Address the driver wrote.
        addr: u64,
        /// Required alignment.
        align: u64,
    },
    /// A ring does not lie in guest RAM.
    #[error("queue {index} {ring} at {addr:#x} (+{len:#x}) is outside guest memory; place the ring in RAM")]
    OutsideMemory {
        /// Queue index.
        index: usize,
        /// Which ring.
        ring: &'static str,
        /// Address the driver wrote.
        addr: u64,
        /// Ring length in bytes.
        len: u64,
    },
}

/// The registers of one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct QueueConfig {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    /// A disabled queue offering `max_size` entries.
    pub(crate) fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Whether the driver enabled the queue.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    fn size_valid(&self) -> bool {
        self.size != 0 && self.size.is_power_of_two() && self.size <= self.max_size
    }

    /// Checks the size and that the three rings are aligned and inside guest memory.
    pub(crate) fn validate(
        &self,
        index: usize,
        mem: &GuestMemoryMmap,
    ) -> Result<(), QueueConfigError> {
        if !self.size_valid() {
            return Err(QueueConfigError::Size {
                index,
                size: self.size,
                max: self.max_size,
            });
        }
        let size = u64::from(self.size);
        // Ring sizes include the event-index word at the end of the available and used rings.
        let rings = [
            ("descriptor table", self.desc, DESC_ALIGN, 16 * size),
            ("available ring", self.driver, AVAIL_ALIGN, 6 + 2 * size),
            ("used ring", self.device, USED_ALIGN, 6 + 8 * size),
        ];
        for (ring, addr, align, len) in rings {
            if !addr.is_multiple_of(align) {
                return Err(QueueConfigError::Misaligned {
                    index,
                    ring,
                    addr,
                    align,
                });
            }
            let fits = addr.checked_add(len).is_some()
                && usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len));
            if !fits {
                return Err(QueueConfigError::OutsideMemory {
                    index,
                    ring,
                    addr,
                    len,
                });
            }
        }
        Ok(())
    }

    /// The virtio-queue [`Queue`] for these registers, ready to serve.
    pub(crate) fn build(&self, event_idx: bool) -> Result<Queue, virtio_queue::Error> {
        let mut queue = Queue::new(self.max_size)?;
        queue.try_set_size(self.size)?;
        queue.try_set_desc_table_address(GuestAddress(self.desc))?;
        queue.try_set_avail_ring_address(GuestAddress(self.driver))?;
        queue.try_set_used_ring_address(GuestAddress(self.device))?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        Ok(queue)
    }
}

/// What a common configuration write asks the transport to do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WriteEffect {
    /// Nothing more.
    None,
    /// The driver wrote this value to `device_status`.
    Status(u8),
    /// The driver misconfigured a queue: the device needs a reset.
    NeedsReset(QueueConfigError),
}

/// The state of the common configuration registers (MSI-X vectors aside: see [`InterruptVectors`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CommonConfig {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    device_status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
}

impl CommonConfig {
    /// Registers after reset for queues of these maximum sizes.
    pub(crate) fn new(queue_max_sizes: &[u16]) -> Self {
        Self {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            device_status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: queue_max_sizes
                .iter()
                .map(|max| QueueConfig::new(*max))
                .collect(),
        }
    }

    /// Device reset: everything back to its initial value except `config_generation`.
    pub(crate) fn reset(&mut self) {
        let generation = self.config_generation;
        let max_sizes: Vec<u16> = self.queues.iter().map(|queue| queue.max_size).collect();
        *self = Self::new(&max_sizes);
        self.config_generation = generation;
    }

    /// The device status the driver has set (without DEVICE_NEEDS_RESET).
    pub(crate) fn device_status(&self) -> u8 {
        self.device_status
    }

    /// Records the device status.
    pub(crate) fn set_device_status(&mut self, status: u8) {
        self.device_status = status;
    }

    /// The features the driver has written.
    pub(crate) fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The queues' registers.
    pub(crate) fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    /// Records a device configuration change.
    pub(crate) fn bump_config_generation(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// Driver read of `data.len()` bytes at `offset`.
    pub(crate) fn read(
        &self,
        offset: u64,
        data: &mut [u8],
        device_features: u64,
        vectors: &InterruptVectors,
        needs_reset: bool,
    ) {
        data.fill(0);
        let Some((field, part)) = decode(offset, data.len()) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "invalid virtio common config read"
            );
            return;
        };
        let queue = self.selected_queue();
        let select = usize::from(self.queue_select);
        let feature_word = |features: u64, select: u32| match select {
            0 => features & 0xffff_ffff,
            1 => features >> 32,
            _ => 0,
        };
        let value: u64 = match field {
            Field::DeviceFeatureSelect => self.device_feature_select.into(),
            Field::DeviceFeature => feature_word(device_features, self.device_feature_select),
            Field::DriverFeatureSelect => self.driver_feature_select.into(),
            Field::DriverFeature => feature_word(self.driver_features, self.driver_feature_select),
            Field::MsixConfig => vectors.config().into(),
            Field::NumQueues => self.queues.len() as u64,
            Field::DeviceStatus => {
                let reset_bit = if needs_reset { STATUS_NEEDS_RESET } else { 0 };
                (self.device_status | reset_bit).into()
            }
            Field::ConfigGeneration => self.config_generation.into(),
            Field::QueueSelect => self.queue_select.into(),
            Field::QueueSize => queue.map_or(0, |queue| queue.size.into()),
            Field::QueueMsixVector => queue.map_or(0, |_| vectors.queue(select).into()),
            Field::QueueEnable => queue.map_or(0, |queue| queue.enabled.into()),
            Field::QueueNotifyOff => queue.map_or(0, |_| self.queue_select.into()),
            Field::QueueDesc => queue.map_or(0, |queue| get_part(queue.desc, part)),
            Field::QueueDriver => queue.map_or(0, |queue| get_part(queue.driver, part)),
            Field::QueueDevice => queue.map_or(0, |queue| get_part(queue.device, part)),
        };
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    /// Driver write of `data` at `offset`. Queue enables are checked against `mem`.
    pub(crate) fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        vectors: &InterruptVectors,
        mem: &GuestMemoryMmap,
    ) -> WriteEffect {
        let Some((field, part)) = decode(offset, data.len()) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "dropping invalid virtio common config write"
            );
            return WriteEffect::None;
        };
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let driver_ok = self.device_status & STATUS_DRIVER_OK != 0;
        match field {
            Field::DeviceFeatureSelect => self.device_feature_select = value as u32,
            Field::DriverFeatureSelect => self.driver_feature_select = value as u32,
            Field::DriverFeature => self.write_driver_features(value as u32),
            Field::MsixConfig => vectors.set_config(value as u16),
            Field::DeviceStatus => return WriteEffect::Status(value as u8),
            Field::QueueSelect => self.queue_select = value as u16,
            Field::QueueMsixVector => {
                vectors.set_queue(usize::from(self.queue_select), value as u16)
            }
            Field::QueueSize
            | Field::QueueEnable
            | Field::QueueDesc
            | Field::QueueDriver
            | Field::QueueDevice => {
                let index = usize::from(self.queue_select);
                let Some(queue) = self.queues.get_mut(index) else {
                    tracing::debug!(index, "dropping a write to a queue that does not exist");
                    return WriteEffect::None;
                };
                if queue.enabled || driver_ok {
                    tracing::debug!(
                        index,
                        ?field,
                        "dropping a write to a live queue's registers"
                    );
                    return WriteEffect::None;
                }
                return write_queue(queue, index, field, part, value, mem);
            }
            Field::DeviceFeature
            | Field::NumQueues
            | Field::ConfigGeneration
            | Field::QueueNotifyOff => {
                tracing::debug!(?field, "dropping a write to a read-only virtio register");
            }
        }
        WriteEffect::None
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.device_status & STATUS_FEATURES_OK != 0 {
            tracing::debug!("dropping a feature write after FEATURES_OK");
            return;
        }
        let value = u64::from(value);
        self.driver_features = match self.driver_feature_select {
            0 => set_part(self.driver_features, Part::Low, value),
            1 => set_part(self.driver_features, Part::High, value),
            select => {
                // No feature bits exist past 63; a non-zero write there is a driver bug we cannot honour.
                if value != 0 {
                    tracing::debug!(select, "dropping a write to a feature word past bit 63");
                }
                self.driver_features
            }
        };
    }
}

/// Applies a write to an unlocked queue register.
fn write_queue(
    queue: &mut QueueConfig,
    index: usize,
    field: Field,
    part: Part,
    value: u64,
    mem: &GuestMemoryMmap,
) -> WriteEffect {
    match field {
        Field::QueueSize => {
            let previous = queue.size;
            queue.size = value as u16;
            if !queue.size_valid() {
                let err = QueueConfigError::Size {
                    index,
                    size: queue.size,
                    max: queue.max_size,
                };
                queue.size = previous;
                return WriteEffect::NeedsReset(err);
            }
        }
        Field::QueueEnable => {
            if value != 1 {
                // Writing 0 is reserved for queue reset, which this transport does not offer.
                tracing::debug!(index, value, "dropping a queue_enable write other than 1");
                return WriteEffect::None;
            }
            if let Err(err) = queue.validate(index, mem) {
                return WriteEffect::NeedsReset(err);
            }
            queue.enabled = true;
        }
        Field::QueueDesc => queue.desc = set_part(queue.desc, part, value),
        Field::QueueDriver => queue.driver = set_part(queue.driver, part, value),
        Field::QueueDevice => queue.device = set_part(queue.device, part, value),
        _ => {}
    }
    WriteEffect::None
}

/// What a driver write to `device_status` means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StatusChange {
    /// Writing 0: reset the device.
    Reset,
    /// A valid step forward to `status`; the flags say which milestones it newly reaches.
    Advance {
        /// The new status (driver-settable bits only).
        status: u8,
        /// FEATURES_OK is newly set: the features must be checked.
        features_ok: bool,
        /// DRIVER_OK is newly set: the device must be activated.
        driver_ok: bool,
    },
    /// The write breaks the initialization order or clears bits; it is ignored.
    Invalid(&'static str),
}

/// Classifies a driver write of `written` to `device_status` when the status is `old`. The order is ACKNOWLEDGE,
/// DRIVER, FEATURES_OK, DRIVER_OK (virtio 1.2 §3.1.1); FAILED may be set at any time; only a write of 0 clears bits.
/// DEVICE_NEEDS_RESET belongs to the device and is ignored in the written value.
pub(crate) fn status_change(old: u8, written: u8) -> StatusChange {
    if written == 0 {
        return StatusChange::Reset;
    }
    let status = written & DRIVER_STATUS_BITS;
    if old & !status != 0 {
        return StatusChange::Invalid("status bits can only be cleared by writing 0");
    }
    let requires = [
        (
            STATUS_DRIVER,
            STATUS_ACKNOWLEDGE,
            "DRIVER needs ACKNOWLEDGE",
        ),
        (
            STATUS_FEATURES_OK,
            STATUS_DRIVER,
            "FEATURES_OK needs DRIVER",
        ),
        (
            STATUS_DRIVER_OK,
            STATUS_FEATURES_OK,
            "DRIVER_OK needs FEATURES_OK",
        ),
    ];
    for (bit, needed, reason) in requires {
        if status & bit != 0 && status & needed == 0 {
            return StatusChange::Invalid(reason);
        }
    }
    let added = status & !old;
    StatusChange::Advance {
        status,
        features_ok: added & STATUS_FEATURES_OK != 0,
        driver_ok: added & STATUS_DRIVER_OK != 0,
    }
}

#[cfg(test)]
#[path = "common_config_tests.rs"]
mod tests;
