//! Guest RAM: anonymous mappings laid out by `arch`, registered with the hypervisor as memory slots.
//!
//! A virtio-mem region is one more anonymous mapping (reserved, not committed: `MAP_NORESERVE`) in one slot. It is in
//! the memory map devices use for DMA, so they reach plugged blocks; nothing stops DMA into unplugged blocks, which
//! only costs host memory the region could hold anyway. It is not counted in [`MemoryManager::ram_size`]: the guest
//! owns only what its driver plugged.

use std::sync::Arc;

use hypervisor::{MemoryRegion, Vm};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not map the guest's RAM.
    #[error("cannot allocate {size} MiB of guest memory: {reason}; lower --memory size=")]
    Allocate {
        /// Requested size in MiB.
        size: u64,
        /// What the allocator said.
        reason: String,
    },
    /// The hot-added range is not usable.
    #[error("cannot hot-add {size:#x} bytes at {base:#x}: {reason}")]
    Hotplug {
        /// Base address.
        base: u64,
        /// Size.
        size: u64,
        /// Why.
        reason: String,
    },
    /// The hypervisor refused a memory slot.
    /// A read-only (firmware) mapping could not be made.
    #[error("cannot map the {size:#x}-byte firmware at {base:#x}: {reason}")]
    Rom {
        /// Base address.
        base: u64,
        /// Size.
        size: u64,
        /// Why.
        reason: String,
    },
    #[error("cannot register guest memory with KVM: {0}")]
    Register(#[source] hypervisor::HypervisorError),
    /// The virtio-mem region cannot be reserved.
    #[error("cannot reserve the {size:#x}-byte virtio-mem region at {base:#x}: {reason}; lower --memory hotplug_size=")]
    VirtioMem {
        /// Base address.
        base: u64,
        /// Size.
        size: u64,
        /// Why.
        reason: String,
    },
}

/// Owns the guest's RAM mappings for the lifetime of a VM.
pub struct MemoryManager {
    guest_memory: GuestMemoryMmap,
    next_slot: u32,
    /// Read-only mappings (firmware), not part of guest RAM: devices cannot DMA into them.
    roms: Vec<GuestRegionMmap>,
    /// The virtio-mem region's base address, if there is one (it is in `guest_memory`, but not RAM yet).
    virtio_mem_base: Option<u64>,
}

impl MemoryManager {
    /// Maps `size` bytes of guest RAM (split around the 32-bit MMIO gap) and registers each region with `vm`.
    pub fn new(vm: &Arc<dyn Vm>, size: u64) -> Result<Self, MemoryError> {
        let ranges = arch::arch_memory_regions(size);
        let guest_memory =
            GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Allocate {
                size: size >> 20,
                reason: e.to_string(),
            })?;
        let mut manager = MemoryManager {
            guest_memory,
            next_slot: 0,
            roms: Vec::new(),
            virtio_mem_base: None,
        };
        let regions: Vec<(u64, u64, u64)> = manager
            .guest_memory
            .iter()
            .map(|r| {
                let host = r
                    .get_host_address(MemoryRegionAddress(0))
                    .map(|p| p as u64)
                    .unwrap_or_default();
                (r.start_addr().0, r.len(), host)
            })
            .collect();
        for (guest_addr, len, host_addr) in regions {
            let slot = manager.next_slot;
            manager.next_slot += 1;
            let region = MemoryRegion {
                slot,
                guest_addr,
                size: len,
                host_addr,
                readonly: false,
            };
            // SAFETY: `host_addr..host_addr+len` is a mapping owned by `guest_memory`, which this manager keeps alive
            // at least as long as the VM (the VM is dropped before the manager in `Vm`'s field order).
            unsafe { vm.set_memory_region(region) }.map_err(MemoryError::Register)?;
        }
        Ok(manager)
    }

    /// Maps `size` more bytes of RAM at `base`, registers them with `vm`, and returns the enlarged memory map (for
    /// devices that access guest memory).
    pub fn hotplug(
        &mut self,
        vm: &Arc<dyn Vm>,
        base: u64,
        size: u64,
    ) -> Result<GuestMemoryMmap, MemoryError> {
        let bad = |reason: String| MemoryError::Hotplug { base, size, reason };
        let len = usize::try_from(size).map_err(|e| bad(e.to_string()))?;
        let region = GuestRegionMmap::from_range(GuestAddress(base), len, None)
            .map_err(|e| bad(e.to_string()))?;
        let host_addr = region
            .get_host_address(MemoryRegionAddress(0))
            .map(|p| p as u64)
            .map_err(|e| bad(e.to_string()))?;
        let memory = self
            .guest_memory
            .insert_region(Arc::new(region))
            .map_err(|e| bad(e.to_string()))?;
        let slot = self.next_slot;
        let mapping = MemoryRegion {
            slot,
            guest_addr: base,
            size,
            host_addr,
            readonly: false,
        };
        // SAFETY: the mapping belongs to the region just inserted into `memory`, which replaces `guest_memory` below
        // and so lives as long as the VM.
        unsafe { vm.set_memory_region(mapping) }.map_err(MemoryError::Register)?;
        self.next_slot += 1;
        self.guest_memory = memory.clone();
        Ok(memory)
    }

    /// The guest's RAM.
    /// Maps `contents` read-only at guest address `base` (firmware flash): guest reads see it, guest writes exit to the
    /// VMM (and are ignored there). It is not guest RAM: it is not in [`Self::guest_memory`].
    pub fn map_rom(
        &mut self,
        vm: &Arc<dyn Vm>,
        base: u64,
        contents: &[u8],
    ) -> Result<(), MemoryError> {
        let size = contents.len() as u64;
        let bad = |reason: String| MemoryError::Rom { base, size, reason };
        let region = GuestRegionMmap::from_range(GuestAddress(base), contents.len(), None)
            .map_err(|e| bad(e.to_string()))?;
        region
            .write_slice(contents, MemoryRegionAddress(0))
            .map_err(|e| bad(e.to_string()))?;
        let host_addr = region
            .get_host_address(MemoryRegionAddress(0))
            .map(|p| p as u64)
            .map_err(|e| bad(e.to_string()))?;
        let mapping = MemoryRegion {
            slot: self.next_slot,
            guest_addr: base,
            size,
            host_addr,
            readonly: true,
        };
        // SAFETY: the mapping belongs to `region`, which is kept in `self.roms` and so lives as long as the VM (the VM
        // is dropped before the memory manager).
        unsafe { vm.set_memory_region(mapping) }.map_err(MemoryError::Register)?;
        self.next_slot += 1;
        self.roms.push(region);
        Ok(())
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.guest_memory
    }

    /// Total RAM in bytes: boot RAM and ACPI-added memory, not the virtio-mem region.
    pub fn ram_size(&self) -> u64 {
        self.guest_memory
            .iter()
            .filter(|r| Some(r.start_addr().0) != self.virtio_mem_base)
            .map(|r| r.len())
            .sum()
    }

    /// Reserves the virtio-mem region `base..base + size` (anonymous, `MAP_NORESERVE`), registers it with `vm` as one
    /// slot and adds it to the guest memory map. Returns how the device gives unplugged blocks back to the host.
    pub fn add_virtio_mem_region(
        &mut self,
        vm: &Arc<dyn Vm>,
        base: u64,
        size: u64,
    ) -> Result<Arc<dyn virtio_devices::MemoryDiscard>, MemoryError> {
        let bad = |reason: String| MemoryError::VirtioMem { base, size, reason };
        if self.virtio_mem_base.is_some() {
            return Err(bad("the VM has a virtio-mem region already".to_string()));
        }
        let len = usize::try_from(size).map_err(|e| bad(e.to_string()))?;
        // vm-memory maps anonymous regions MAP_PRIVATE | MAP_NORESERVE: nothing is committed until the guest touches it.
        let region = Arc::new(
            GuestRegionMmap::from_range(GuestAddress(base), len, None)
                .map_err(|e| bad(e.to_string()))?,
        );
        let host_addr = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| bad(e.to_string()))?;
        let memory = self
            .guest_memory
            .insert_region(region.clone())
            .map_err(|e| bad(e.to_string()))?;
        let mapping = MemoryRegion {
            slot: self.next_slot,
            guest_addr: base,
            size,
            host_addr: host_addr as u64,
            readonly: false,
        };
        // SAFETY: the mapping belongs to `region`, which goes into `guest_memory` below (and into the discard handle)
        // and so lives as long as the VM.
        unsafe { vm.set_memory_region(mapping) }.map_err(MemoryError::Register)?;
        self.next_slot += 1;
        self.guest_memory = memory;
        self.virtio_mem_base = Some(base);
        Ok(Arc::new(AnonymousDiscard { region }))
    }
}

/// Releases blocks of an anonymous private mapping with `madvise(MADV_DONTNEED)`: the host frees the pages, KVM
/// drops its mappings of them, and the next guest access finds zeroes.
struct AnonymousDiscard {
    region: Arc<GuestRegionMmap>,
}

impl virtio_devices::MemoryDiscard for AnonymousDiscard {
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let invalid = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("discard {offset:#x}+{len:#x}: {what}"),
            )
        };
        let page = 4096;
        if !offset.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(invalid("not whole pages"));
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.region.len())
        {
            return Err(invalid("outside the region"));
        }
        if len == 0 {
            return Ok(());
        }
        let start = self
            .region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|e| invalid(&e.to_string()))?;
        let len = usize::try_from(len).map_err(|e| invalid(&e.to_string()))?;
        // SAFETY: `start..start + len` lies inside the region's mapping (checked above), which `self.region` keeps
        // mapped; MADV_DONTNEED on a private anonymous mapping only replaces its pages with zero-fill-on-demand ones,
        // which is what an unplugged block is. No Rust reference points into guest memory.
        let ret = unsafe { libc::madvise(start.cast(), len, libc::MADV_DONTNEED) };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
