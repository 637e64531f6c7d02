//! The device-managed region and its plugged-block bitmap: the configuration space the driver reads, and the rules
//! that decide every request (virtio 1.2 §5.15.6.2-5).
//!
//! A range is valid when it names at least one block, starts on a block boundary inside the region and ends inside
//! the usable part of it (here the whole region). An invalid range, plugging a plugged block or unplugging an
//! unplugged one is answered ERROR; a plug that would take the plugged size past the requested size NACK; a host
//! failure to release memory BUSY (nothing changes then). Unplugged memory is released through [`MemoryDiscard`]
//! before the blocks are marked unplugged.

use std::io;

use serde::{Deserialize, Serialize};

use super::request::{BlockRange, BlockState, MemRequest, MemResponse};
use super::VirtioMemError;

/// Size of the virtio-mem configuration space.
pub const VIRTIO_MEM_CONFIG_SIZE: usize = 56;
/// The most blocks a region may have (a 2 MiB bitmap; 32 TiB with 2 MiB blocks).
pub const VIRTIO_MEM_MAX_BLOCKS: u64 = 1 << 24;
/// The smallest block size (a page).
const MIN_BLOCK_SIZE: u64 = 4 << 10;

/// How the device gives memory back to the host: the VMM implements it over the region's mapping (for an anonymous
/// mapping, `madvise(MADV_DONTNEED)`), so the device never touches host mappings itself.
pub trait MemoryDiscard: Send + Sync {
    /// Releases `len` bytes at byte `offset` of the region; the guest reads zeroes there afterwards. `offset` and
    /// `len` are multiples of the block size and inside the region.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// Where the device-managed region is and how it is divided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMemGeometry {
    /// Guest physical address of the region (a multiple of `block_size`).
    pub addr: u64,
    /// Size of the region (a non-zero multiple of `block_size`).
    pub region_size: u64,
    /// Size of a block (a power of two, at least 4 KiB).
    pub block_size: u64,
    /// The NUMA node (only meaningful with VIRTIO_MEM_F_ACPI_PXM, which this device does not offer).
    pub node_id: u16,
}

impl VirtioMemGeometry {
    /// Number of blocks, after checking the geometry.
    fn blocks(&self) -> Result<u64, VirtioMemError> {
        let bad = |reason: &'static str| VirtioMemError::BadGeometry {
            addr: self.addr,
            region_size: self.region_size,
            block_size: self.block_size,
            reason,
        };
        if !self.block_size.is_power_of_two() || self.block_size < MIN_BLOCK_SIZE {
            return Err(bad(
                "the block size must be a power of two of at least 4 KiB",
            ));
        }
        if self.region_size == 0 || !self.region_size.is_multiple_of(self.block_size) {
            return Err(bad(
                "the region size must be a non-zero multiple of the block size",
            ));
        }
        if !self.addr.is_multiple_of(self.block_size)
            || self.addr.checked_add(self.region_size).is_none()
        {
            return Err(bad(
                "the region must start on a block boundary and not wrap",
            ));
        }
        let blocks = self.region_size / self.block_size;
        if blocks > VIRTIO_MEM_MAX_BLOCKS {
            return Err(bad(
                "the region has more than 2^24 blocks; use a larger block size",
            ));
        }
        Ok(blocks)
    }
}

/// The device's state a snapshot needs: the region, the sizes and which blocks are plugged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMemState {
    /// The region.
    pub geometry: VirtioMemGeometry,
    /// The size the VMM asks the driver to reach.
    pub requested_size: u64,
    /// Plugged blocks, bit `i % 64` of word `i / 64` for block `i`.
    pub plugged: Vec<u64>,
}

/// The region, the sizes and the plugged-block bitmap: the rules that answer every request, on their own (the device
/// serves its queue with them; fuzzing drives them directly).
#[derive(Debug)]
pub struct BlockMap {
    geometry: VirtioMemGeometry,
    blocks: u64,
    usable_region_size: u64,
    requested_size: u64,
    plugged: Vec<u64>,
    plugged_blocks: u64,
}

impl BlockMap {
    /// A region with nothing plugged and nothing requested.
    pub fn new(geometry: VirtioMemGeometry) -> Result<Self, VirtioMemError> {
        let blocks = geometry.blocks()?;
        Ok(Self {
            geometry,
            blocks,
            usable_region_size: geometry.region_size,
            requested_size: 0,
            plugged: vec![0; words(blocks)],
            plugged_blocks: 0,
        })
    }

    /// The state saved by [`BlockMap::state`], checked.
    pub fn restore(state: &VirtioMemState) -> Result<Self, VirtioMemError> {
        let mut blocks = Self::new(state.geometry)?;
        if state.plugged.len() != blocks.plugged.len() {
            return Err(VirtioMemError::BadState(
                "the bitmap does not match the region's block count",
            ));
        }
        let tail = blocks.blocks % 64;
        if tail != 0 && state.plugged.last().is_some_and(|word| word >> tail != 0) {
            return Err(VirtioMemError::BadState(
                "the bitmap marks blocks past the end of the region",
            ));
        }
        blocks.set_requested_size(state.requested_size)?;
        blocks.plugged.clone_from(&state.plugged);
        blocks.plugged_blocks = state
            .plugged
            .iter()
            .map(|word| u64::from(word.count_ones()))
            .sum();
        Ok(blocks)
    }

    /// The state to save.
    pub fn state(&self) -> VirtioMemState {
        VirtioMemState {
            geometry: self.geometry,
            requested_size: self.requested_size,
            plugged: self.plugged.clone(),
        }
    }

    /// The region.
    pub fn geometry(&self) -> VirtioMemGeometry {
        self.geometry
    }

    /// Bytes plugged.
    pub fn plugged_size(&self) -> u64 {
        // Lossless: at most the region size.
        self.plugged_blocks * self.geometry.block_size
    }

    /// The size the driver is asked to reach.
    pub fn requested_size(&self) -> u64 {
        self.requested_size
    }

    /// Sets the size the driver should reach: a multiple of the block size, at most the region.
    pub fn set_requested_size(&mut self, bytes: u64) -> Result<(), VirtioMemError> {
        if !bytes.is_multiple_of(self.geometry.block_size) {
            return Err(VirtioMemError::UnalignedSize {
                size: bytes,
                block_size: self.geometry.block_size,
            });
        }
        if bytes > self.usable_region_size {
            return Err(VirtioMemError::SizeBeyondRegion {
                size: bytes,
                region_size: self.usable_region_size,
            });
        }
        self.requested_size = bytes;
        Ok(())
    }

    /// The configuration space (virtio 1.2 §5.15.4), little-endian.
    pub fn config(&self) -> [u8; VIRTIO_MEM_CONFIG_SIZE] {
        let mut config = [0u8; VIRTIO_MEM_CONFIG_SIZE];
        config[0..8].copy_from_slice(&self.geometry.block_size.to_le_bytes());
        config[8..10].copy_from_slice(&self.geometry.node_id.to_le_bytes());
        config[16..24].copy_from_slice(&self.geometry.addr.to_le_bytes());
        config[24..32].copy_from_slice(&self.geometry.region_size.to_le_bytes());
        config[32..40].copy_from_slice(&self.usable_region_size.to_le_bytes());
        config[40..48].copy_from_slice(&self.plugged_size().to_le_bytes());
        config[48..56].copy_from_slice(&self.requested_size.to_le_bytes());
        config
    }

    /// The blocks a range names: (first block index, count); `None` if the range is invalid.
    fn resolve(&self, range: BlockRange) -> Option<(u64, u64)> {
        if range.nb_blocks == 0 {
            return None;
        }
        let offset = range.addr.checked_sub(self.geometry.addr)?;
        if !offset.is_multiple_of(self.geometry.block_size) {
            return None;
        }
        let count = u64::from(range.nb_blocks);
        let end = count
            .checked_mul(self.geometry.block_size)
            .and_then(|len| offset.checked_add(len))?;
        if end > self.usable_region_size {
            return None;
        }
        Some((offset / self.geometry.block_size, count))
    }

    fn is_plugged(&self, block: u64) -> bool {
        // Lossless: block < blocks <= 2^24.
        self.plugged[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn set_plugged(&mut self, block: u64, plugged: bool) {
        let word = &mut self.plugged[(block / 64) as usize];
        let bit = 1u64 << (block % 64);
        if plugged {
            *word |= bit;
        } else {
            *word &= !bit;
        }
    }

    fn plugged_in(&self, first: u64, count: u64) -> u64 {
        (first..first + count)
            .filter(|block| self.is_plugged(*block))
            .count() as u64
    }

    /// Carries out one request.
    pub fn process(&mut self, request: MemRequest, discard: &dyn MemoryDiscard) -> MemResponse {
        match request {
            MemRequest::Plug(range) => self.plug(range),
            MemRequest::Unplug(range) => self.unplug(range, discard),
            MemRequest::UnplugAll => self.unplug_all(discard),
            MemRequest::State(range) => match self.resolve(range) {
                None => MemResponse::Error,
                Some((first, count)) => {
                    MemResponse::AckState(match self.plugged_in(first, count) {
                        0 => BlockState::Unplugged,
                        n if n == count => BlockState::Plugged,
                        _ => BlockState::Mixed,
                    })
                }
            },
            MemRequest::Unsupported(_) => MemResponse::Error,
        }
    }

    fn plug(&mut self, range: BlockRange) -> MemResponse {
        let Some((first, count)) = self.resolve(range) else {
            return MemResponse::Error;
        };
        if self.plugged_in(first, count) != 0 {
            return MemResponse::Error;
        }
        // No overflow: both sides are at most the region size.
        if (self.plugged_blocks + count) * self.geometry.block_size > self.requested_size {
            return MemResponse::Nack;
        }
        for block in first..first + count {
            self.set_plugged(block, true);
        }
        self.plugged_blocks += count;
        MemResponse::Ack
    }

    fn unplug(&mut self, range: BlockRange, discard: &dyn MemoryDiscard) -> MemResponse {
        let Some((first, count)) = self.resolve(range) else {
            return MemResponse::Error;
        };
        if self.plugged_in(first, count) != count {
            return MemResponse::Error;
        }
        let block_size = self.geometry.block_size;
        if let Err(err) = discard.discard(first * block_size, count * block_size) {
            tracing::warn!(%err, "virtio-mem: cannot release unplugged memory");
            return MemResponse::Busy;
        }
        for block in first..first + count {
            self.set_plugged(block, false);
        }
        self.plugged_blocks -= count;
        MemResponse::Ack
    }

    fn unplug_all(&mut self, discard: &dyn MemoryDiscard) -> MemResponse {
        if self.plugged_blocks > 0 {
            if let Err(err) = discard.discard(0, self.usable_region_size) {
                tracing::warn!(%err, "virtio-mem: cannot release unplugged memory");
                return MemResponse::Busy;
            }
        }
        self.plugged.fill(0);
        self.plugged_blocks = 0;
        MemResponse::Ack
    }
}

/// Number of 64-bit words for `blocks` bits.
fn words(blocks: u64) -> usize {
    // Lossless: blocks <= 2^24.
    blocks.div_ceil(64) as usize
}
