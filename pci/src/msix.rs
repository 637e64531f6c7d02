//! MSI-X: the capability structure, the vector table and the pending-bit array (PBA).
//!
//! [`MsixCapability`] is what goes into the configuration space; [`MsixConfig`] holds the table and PBA a device
//! exposes through one of its BARs and decides, when the device fires a vector, whether to deliver it now or hold it
//! pending. A vector is held while MSI-X is enabled but either the function mask or the vector's own mask bit is set;
//! it is delivered as soon as both are clear. Delivery and the VMM's interrupt routes go through [`MsiDelivery`].
//!
//! Table and PBA accesses must be aligned 4- or 8-byte accesses; anything else reads all-ones and writes nothing.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bar::NUM_BARS;
use crate::capability::{PciCapability, PciCapabilityId};

/// Most vectors an MSI-X table can hold (the table size field is 11 bits, N-1 encoded).
pub const MAX_MSIX_VECTORS: u16 = 2048;
/// Size of one table entry in bytes.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Message control bit: MSI-X is enabled.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message control bit: all vectors of the function are masked.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control bit: this vector is masked.
const VECTOR_CONTROL_MASK_BIT: u32 = 1;
/// Low bits of the table/PBA offset dword that hold the BAR indicator.
const BIR_MASK: u32 = 0x7;

/// Sends MSI-X messages and keeps the VMM's interrupt routes in line with the table.
///
/// The VMM implements it with KVM GSI routing and irqfds (or `KVM_SIGNAL_MSI`).
pub trait MsiDelivery: Send + Sync {
    /// Sends the message of `vector` now.
    fn deliver(&self, vector: u16, address: u64, data: u32) -> std::io::Result<()>;
    /// The route of `vector` changed: new message, or it became masked or unmasked.
    fn update_route(
        &self,
        vector: u16,
        address: u64,
        data: u32,
        masked: bool,
    ) -> std::io::Result<()>;
}

/// Errors of the MSI-X layer.
#[derive(Debug, Error)]
pub enum MsixError {
    /// The vector count is 0 or above 2048.
    #[error("MSI-X vector count {0} is invalid; use 1 to 2048 vectors")]
    InvalidVectorCount(usize),
    /// The device fired a vector past the end of its table.
    #[error("MSI-X vector {vector} is out of range; the table has {count} vectors")]
    VectorOutOfRange {
        /// The vector fired.
        vector: u16,
        /// Table size.
        count: u16,
    },
    /// A BAR indicator past BAR 5.
    #[error("MSI-X BAR indicator {0} is invalid; the table and PBA must live in BAR 0 to 5")]
    InvalidBir(u8),
    /// Table or PBA offset not 8-byte aligned.
    #[error(
        "MSI-X structure offset {0:#x} is not 8-byte aligned; align the table and PBA to 8 bytes"
    )]
    MisalignedOffset(u32),
    /// The VMM could not send the message.
    #[error("failed to deliver MSI-X vector {vector}: {source}")]
    Delivery {
        /// The vector being delivered.
        vector: u16,
        /// Why delivery failed.
        source: std::io::Error,
    },
    /// A saved state is inconsistent.
    #[error("saved MSI-X state is invalid: {0}; discard the state and rebuild the device")]
    InvalidState(&'static str),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, MsixError>;

/// The MSI-X capability structure: table size and where the table and PBA live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    table_size: u16,
    table_bir: u8,
    table_offset: u32,
    pba_bir: u8,
    pba_offset: u32,
}

impl MsixCapability {
    /// A capability for `table_size` vectors with the table at `table_offset` in BAR `table_bir` and the PBA at
    /// `pba_offset` in BAR `pba_bir`.
    pub fn new(
        table_size: u16,
        table_bir: u8,
        table_offset: u32,
        pba_bir: u8,
        pba_offset: u32,
    ) -> Result<Self> {
        if table_size == 0 || table_size > MAX_MSIX_VECTORS {
            return Err(MsixError::InvalidVectorCount(usize::from(table_size)));
        }
        for bir in [table_bir, pba_bir] {
            if usize::from(bir) >= NUM_BARS {
                return Err(MsixError::InvalidBir(bir));
            }
        }
        for offset in [table_offset, pba_offset] {
            if offset % 8 != 0 {
                return Err(MsixError::MisalignedOffset(offset));
            }
        }
        Ok(Self {
            table_size,
            table_bir,
            table_offset,
            pba_bir,
            pba_offset,
        })
    }

    /// Number of vectors.
    pub fn table_size(&self) -> u16 {
        self.table_size
    }

    /// BAR holding the table.
    pub fn table_bir(&self) -> u8 {
        self.table_bir
    }

    /// Offset of the table within its BAR.
    pub fn table_offset(&self) -> u32 {
        self.table_offset
    }

    /// BAR holding the PBA.
    pub fn pba_bir(&self) -> u8 {
        self.pba_bir
    }

    /// Offset of the PBA within its BAR.
    pub fn pba_offset(&self) -> u32 {
        self.pba_offset
    }
}

impl PciCapability for MsixCapability {
    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::MSIX
    }

    fn body(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(self.table_size - 1).to_le_bytes());
        body.extend_from_slice(&(self.table_offset | u32::from(self.table_bir)).to_le_bytes());
        body.extend_from_slice(&(self.pba_offset | u32::from(self.pba_bir)).to_le_bytes());
        body
    }

    fn writable_bits(&self) -> Vec<u8> {
        // Only the enable and function-mask bits of message control.
        let [low, high] = (MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes();
        vec![low, high]
    }
}

/// Splits the offset dword of an MSI-X capability into (BAR indicator, offset).
pub fn split_bir_offset(value: u32) -> (u8, u32) {
    ((value & BIR_MASK) as u8, value & !BIR_MASK)
}

/// One vector of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixTableEntry {
    /// Message address, low dword (bits 1:0 are always 0).
    pub msg_addr_lo: u32,
    /// Message address, high dword.
    pub msg_addr_hi: u32,
    /// Message data.
    pub msg_data: u32,
    /// Vector control (bit 0: masked).
    pub vector_ctl: u32,
}

impl Default for MsixTableEntry {
    /// The reset state: no message, masked.
    fn default() -> Self {
        Self {
            msg_addr_lo: 0,
            msg_addr_hi: 0,
            msg_data: 0,
            vector_ctl: VECTOR_CONTROL_MASK_BIT,
        }
    }
}

impl MsixTableEntry {
    /// Whether the vector's own mask bit is set.
    pub fn masked(&self) -> bool {
        self.vector_ctl & VECTOR_CONTROL_MASK_BIT != 0
    }

    /// The 64-bit message address.
    pub fn address(&self) -> u64 {
        u64::from(self.msg_addr_hi) << 32 | u64::from(self.msg_addr_lo)
    }

    fn dword(&self, index: usize) -> u32 {
        match index {
            0 => self.msg_addr_lo,
            1 => self.msg_addr_hi,
            2 => self.msg_data,
            _ => self.vector_ctl,
        }
    }

    fn set_dword(&mut self, index: usize, value: u32) {
        match index {
            0 => self.msg_addr_lo = value & !0x3,
            1 => self.msg_addr_hi = value,
            2 => self.msg_data = value,
            _ => self.vector_ctl = value & VECTOR_CONTROL_MASK_BIT,
        }
    }
}

/// What happened to a vector the device fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixTrigger {
    /// The message was sent.
    Delivered,
    /// The vector is masked: its pending bit is set and it is sent when unmasked.
    Pending,
    /// MSI-X is disabled: nothing was sent (the device may use INTx instead).
    Disabled,
}

/// Saved state of an [`MsixConfig`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixConfigState {
    table: Vec<MsixTableEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

/// The MSI-X table and PBA of one function.
pub struct MsixConfig {
    table: Vec<MsixTableEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    delivery: Arc<dyn MsiDelivery>,
}

impl std::fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixConfig")
            .field("vectors", &self.table.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish_non_exhaustive()
    }
}

/// Number of 64-bit PBA words for `vectors` vectors.
fn pba_words(vectors: usize) -> usize {
    vectors.div_ceil(64)
}

/// Reads a dword or qword value into `data`, or all-ones for any other size.
fn fill(data: &mut [u8], value: u64) {
    match data.len() {
        4 => data.copy_from_slice(&(value as u32).to_le_bytes()),
        8 => data.copy_from_slice(&value.to_le_bytes()),
        _ => data.fill(0xff),
    }
}

impl MsixConfig {
    /// A table of `vectors` entries, all masked, MSI-X disabled.
    pub fn new(vectors: u16, delivery: Arc<dyn MsiDelivery>) -> Result<Self> {
        if vectors == 0 || vectors > MAX_MSIX_VECTORS {
            return Err(MsixError::InvalidVectorCount(usize::from(vectors)));
        }
        let vectors = usize::from(vectors);
        Ok(Self {
            table: vec![MsixTableEntry::default(); vectors],
            pba: vec![0; pba_words(vectors)],
            enabled: false,
            function_masked: false,
            delivery,
        })
    }

    /// Number of vectors.
    pub fn num_vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Size in bytes of the table.
    pub fn table_size_bytes(&self) -> u64 {
        self.table.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Size in bytes of the PBA.
    pub fn pba_size_bytes(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the function mask is set.
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// The table entry of `vector`.
    pub fn entry(&self, vector: u16) -> Option<&MsixTableEntry> {
        self.table.get(usize::from(vector))
    }

    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        let vector = usize::from(vector);
        self.pba
            .get(vector / 64)
            .is_some_and(|word| word & (1 << (vector % 64)) != 0)
    }

    fn set_pending(&mut self, vector: usize, pending: bool) {
        if let Some(word) = self.pba.get_mut(vector / 64) {
            let bit = 1u64 << (vector % 64);
            if pending {
                *word |= bit;
            } else {
                *word &= !bit;
            }
        }
    }

    /// Whether `vector` cannot be sent now (MSI-X off, function masked or vector masked).
    fn vector_blocked(&self, vector: usize) -> bool {
        !self.enabled
            || self.function_masked
            || self.table.get(vector).is_none_or(MsixTableEntry::masked)
    }

    /// Applies the guest's message control value (the enable and function-mask bits; others are ignored), updating
    /// routes and sending any pending vectors that are now unmasked.
    ///
    /// The device calls it after every guest write to the first dword of its MSI-X capability, with that register's
    /// upper half: `(config.read_reg(cap_offset / 4) >> 16) as u16`.
    pub fn set_message_control(&mut self, control: u16) {
        let enabled = control & MSIX_ENABLE != 0;
        let function_masked = control & MSIX_FUNCTION_MASK != 0;
        if enabled == self.enabled && function_masked == self.function_masked {
            return;
        }
        let was_enabled = self.enabled;
        self.enabled = enabled;
        self.function_masked = function_masked;
        if enabled || was_enabled {
            for vector in 0..self.table.len() {
                self.update_route(vector);
            }
        }
        self.deliver_unmasked_pending();
    }

    fn update_route(&self, vector: usize) {
        let Some(entry) = self.table.get(vector) else {
            return;
        };
        let masked = self.vector_blocked(vector);
        if let Err(err) =
            self.delivery
                .update_route(vector as u16, entry.address(), entry.msg_data, masked)
        {
            tracing::warn!(vector, %err, "failed to update the MSI-X route");
        }
    }

    fn deliver_unmasked_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for vector in 0..self.table.len() {
            if self.is_pending(vector as u16) && !self.vector_blocked(vector) {
                self.deliver_pending(vector);
            }
        }
    }

    /// Sends a pending vector; its pending bit clears only once the message is out.
    fn deliver_pending(&mut self, vector: usize) {
        let entry = self.table[vector];
        match self
            .delivery
            .deliver(vector as u16, entry.address(), entry.msg_data)
        {
            Ok(()) => self.set_pending(vector, false),
            Err(err) => tracing::warn!(vector, %err, "failed to deliver a pending MSI-X vector"),
        }
    }

    /// The device fires `vector`: sends it now, or holds it pending while masked.
    pub fn trigger(&mut self, vector: u16) -> Result<MsixTrigger> {
        let index = usize::from(vector);
        let Some(entry) = self.table.get(index).copied() else {
            return Err(MsixError::VectorOutOfRange {
                vector,
                count: self.num_vectors(),
            });
        };
        if !self.enabled {
            return Ok(MsixTrigger::Disabled);
        }
        if self.vector_blocked(index) {
            self.set_pending(index, true);
            return Ok(MsixTrigger::Pending);
        }
        self.delivery
            .deliver(vector, entry.address(), entry.msg_data)
            .map_err(|source| MsixError::Delivery { vector, source })?;
        Ok(MsixTrigger::Delivered)
    }

    /// Guest read of the table at `offset` (relative to the table start).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len) || offset >= self.table_size_bytes()
        {
            data.fill(0xff);
            return;
        }
        let entry = &self.table[(offset / MSIX_TABLE_ENTRY_SIZE) as usize];
        let first = ((offset % MSIX_TABLE_ENTRY_SIZE) / 4) as usize;
        let mut value = u64::from(entry.dword(first));
        if len == 8 {
            value |= u64::from(entry.dword(first + 1)) << 32;
        }
        fill(data, value);
    }

    /// Guest write of the table at `offset` (relative to the table start).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len) || offset >= self.table_size_bytes()
        {
            tracing::debug!(offset, len, "dropping invalid MSI-X table write");
            return;
        }
        let vector = (offset / MSIX_TABLE_ENTRY_SIZE) as usize;
        let first = ((offset % MSIX_TABLE_ENTRY_SIZE) / 4) as usize;
        let was_masked = self.table[vector].masked();
        let before = self.table[vector];
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(chunk);
            self.table[vector].set_dword(first + i, u32::from_le_bytes(bytes));
        }
        if self.table[vector] == before {
            return;
        }
        if self.enabled {
            self.update_route(vector);
        }
        if was_masked
            && !self.table[vector].masked()
            && self.is_pending(vector as u16)
            && !self.vector_blocked(vector)
        {
            self.deliver_pending(vector);
        }
    }

    /// Guest read of the PBA at `offset` (relative to the PBA start).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len) || offset >= self.pba_size_bytes() {
            data.fill(0xff);
            return;
        }
        let word = self.pba[(offset / 8) as usize];
        fill(data, word >> ((offset % 8) * 8));
    }

    /// Guest write of the PBA: the PBA is read-only, so the write is dropped.
    pub fn write_pba(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "dropping a write to the read-only MSI-X PBA"
        );
    }

    /// The saved state.
    pub fn state(&self) -> MsixConfigState {
        MsixConfigState {
            table: self.table.clone(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Rebuilds the table from a saved state and, if MSI-X was enabled, re-installs every route.
    pub fn from_state(state: &MsixConfigState, delivery: Arc<dyn MsiDelivery>) -> Result<Self> {
        let vectors = state.table.len();
        if vectors == 0 || vectors > usize::from(MAX_MSIX_VECTORS) {
            return Err(MsixError::InvalidState(
                "the table must have 1 to 2048 entries",
            ));
        }
        if state.pba.len() != pba_words(vectors) {
            return Err(MsixError::InvalidState(
                "the PBA size does not match the table size",
            ));
        }
        let spare_bits = pba_words(vectors) * 64 - vectors;
        if spare_bits > 0
            && state
                .pba
                .last()
                .is_some_and(|word| word >> (64 - spare_bits) != 0)
        {
            return Err(MsixError::InvalidState(
                "a pending bit is set past the last vector",
            ));
        }
        let mut config = Self::new(vectors as u16, delivery)?;
        for (vector, entry) in state.table.iter().enumerate() {
            for dword in 0..4 {
                config.table[vector].set_dword(dword, entry.dword(dword));
            }
        }
        config.pba.clone_from(&state.pba);
        config.enabled = state.enabled;
        config.function_masked = state.function_masked;
        if config.enabled {
            for vector in 0..vectors {
                config.update_route(vector);
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
#[path = "msix_tests.rs"]
mod tests;
