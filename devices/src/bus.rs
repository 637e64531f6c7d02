//! An address space (port I/O or MMIO) mapping non-overlapping ranges to devices.
//!
//! The bus holds weak references: whoever created a device owns it, and a device that has been dropped simply stops
//! claiming its range. Accesses are dispatched with `&self`, so several vCPU threads can use one bus at once; the
//! range table sits behind a read-write lock that is released before the device's own mutex is taken.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock, Weak};

/// A device that can sit on a [`Bus`].
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset`.
    ///
    /// `offset` is relative to the base of the range the device was inserted at.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset`.
    ///
    /// `offset` is relative to the base of the range the device was inserted at.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors placing devices on a bus or taking them off.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error(
        "range {base:#x}+{len:#x} overlaps the device already at {existing_base:#x}+{existing_len:#x}; \
         choose a free range"
    )]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the range in the way.
        existing_base: u64,
        /// Length of the range in the way.
        existing_len: u64,
    },
    /// A range of length zero.
    #[error("a bus range must be at least one byte long")]
    ZeroLength,
    /// The range runs past the end of the address space.
    #[error("range {base:#x}+{len:#x} runs past the end of the 64-bit address space; shorten it or move it down")]
    WrapAround {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// `remove` was given a range that is not on the bus.
    #[error("no device is registered at exactly {base:#x}+{len:#x}; pass the base and length used to insert it")]
    NotFound {
        /// Base of the range asked for.
        base: u64,
        /// Length of the range asked for.
        len: u64,
    },
}

/// One registered range.
struct Slot {
    len: u64,
    device: Weak<Mutex<dyn BusDevice>>,
}

impl Slot {
    /// The last address of a range that starts at `base`.
    fn last(&self, base: u64) -> u64 {
        // Cannot overflow: `insert` rejects ranges that wrap.
        base + (self.len - 1)
    }
}

/// Maps address ranges to devices.
#[derive(Default)]
pub struct Bus {
    /// Ranges by base address; no two overlap.
    slots: RwLock<BTreeMap<u64, Slot>>,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    ///
    /// Adjacent ranges are fine; overlapping ones, zero-length ones and ones that run past `u64::MAX` are rejected.
    /// A range whose device has been dropped no longer counts as occupied.
    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength);
        }
        let last = base
            .checked_add(len - 1)
            .ok_or(BusError::WrapAround { base, len })?;
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        // Every range that overlaps [base, last] starts at or before `last`; walk them from the highest base down
        // until one ends before `base`.
        let mut dead = Vec::new();
        for (&existing_base, slot) in slots.range(..=last).rev() {
            if slot.last(existing_base) < base {
                break;
            }
            if slot.device.strong_count() == 0 {
                dead.push(existing_base);
                continue;
            }
            return Err(BusError::Overlap {
                base,
                len,
                existing_base,
                existing_len: slot.len,
            });
        }
        for stale in dead {
            slots.remove(&stale);
        }
        slots.insert(
            base,
            Slot {
                len,
                device: Arc::downgrade(&device),
            },
        );
        Ok(())
    }

    /// Takes the device at exactly `[base, base + len)` off the bus.
    pub fn remove(&self, base: u64, len: u64) -> Result<(), BusError> {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        match slots.get(&base) {
            Some(slot) if slot.len == len => {
                slots.remove(&base);
                Ok(())
            }
            _ => Err(BusError::NotFound { base, len }),
        }
    }

    /// Finds the live device whose range holds all of `[addr, addr + size)`, with the offset of `addr` in it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(Arc<Mutex<dyn BusDevice>>, u64)> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let (&base, slot) = slots.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(u64::try_from(size).ok()?)?;
        if offset >= slot.len || end > slot.len {
            return None;
        }
        let device = slot.device.upgrade()?;
        Some((device, offset))
    }

    /// Dispatches a read of `data.len()` bytes at `addr`.
    ///
    /// Returns false when no (live) device claims the whole access, including an access that straddles the end of a
    /// range; the caller then returns all-ones to the guest or counts it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((device, offset)) = self.resolve(addr, data.len()) else {
            return false;
        };
        // A device that panicked mid-access left plain register state behind; keep serving it.
        let mut device = device.lock().unwrap_or_else(|p| p.into_inner());
        device.read(offset, data);
        true
    }

    /// Dispatches a write of `data` at `addr`.
    ///
    /// Returns false when no (live) device claims the whole access, as for [`Bus::read`].
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((device, offset)) = self.resolve(addr, data.len()) else {
            return false;
        };
        let mut device = device.lock().unwrap_or_else(|p| p.into_inner());
        device.write(offset, data);
        true
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        f.debug_list()
            .entries(slots.iter().map(|(base, slot)| {
                format!(
                    "{base:#x}+{:#x}{}",
                    slot.len,
                    if slot.device.strong_count() == 0 {
                        " (dropped)"
                    } else {
                        ""
                    }
                )
            }))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// Remembers the last access and counts writes.
    #[derive(Default)]
    struct Probe {
        last_offset: u64,
        last_len: usize,
        writes: u64,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.last_offset = offset;
            self.last_len = data.len();
            data.fill(0x5a);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_offset = offset;
            self.last_len = data.len();
            self.writes += 1;
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn rejects_overlaps_but_accepts_adjacent_ranges() {
        let bus = Bus::new();
        let (a, b, c) = (probe(), probe(), probe());
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        // Directly below and directly above.
        bus.insert(b.clone(), 0xf0, 0x10).unwrap();
        bus.insert(c.clone(), 0x110, 0x10).unwrap();

        let d = probe();
        for (base, len) in [
            (0x100, 0x10),
            (0x10f, 1),
            (0xff, 2),
            (0x80, 0x100),
            (0x105, 1),
            (0x11f, 8),
        ] {
            match bus.insert(d.clone(), base, len) {
                Err(BusError::Overlap {
                    base: b2, len: l2, ..
                }) => assert_eq!((b2, l2), (base, len)),
                other => panic!("{base:#x}+{len:#x}: expected an overlap, got {other:?}"),
            }
        }
        let err = bus.insert(d.clone(), 0x80, 0x100).unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");
        bus.insert(d, 0x120, 1).unwrap();
    }

    #[test]
    fn rejects_zero_length_and_wrap_around() {
        let bus = Bus::new();
        let d = probe();
        assert_eq!(bus.insert(d.clone(), 0x10, 0), Err(BusError::ZeroLength));
        assert_eq!(
            bus.insert(d.clone(), u64::MAX, 2),
            Err(BusError::WrapAround {
                base: u64::MAX,
                len: 2
            })
        );
        // A range ending exactly at the top of the address space is fine.
        bus.insert(d.clone(), u64::MAX - 0xf, 0x10).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(u64::MAX, &mut b));
        // A 2-byte read at the last address would wrap: unclaimed, no panic.
        let mut w = [0u8; 2];
        assert!(!bus.read(u64::MAX, &mut w));
    }

    #[test]
    fn dispatches_with_relative_offsets() {
        let bus = Bus::new();
        let d = probe();
        bus.insert(d.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 2];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [0x5a, 0x5a]);
        let (offset, len) = {
            let probe = d.lock().unwrap();
            (probe.last_offset, probe.last_len)
        };
        assert_eq!((offset, len), (2, 2));
        assert!(bus.write(0x3ff, &[1]));
        assert_eq!(d.lock().unwrap().last_offset, 7);
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.write(0x3f7, &[1]));
        assert!(!bus.read(0, &mut data));
    }

    #[test]
    fn straddling_access_is_unclaimed() {
        let bus = Bus::new();
        let (a, b) = (probe(), probe());
        bus.insert(a.clone(), 0x60, 4).unwrap();
        bus.insert(b.clone(), 0x64, 4).unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0x62, &mut data));
        assert!(!bus.write(0x66, &data));
        assert_eq!(data, [0; 4]);
        assert_eq!(a.lock().unwrap().writes + b.lock().unwrap().writes, 0);
        assert!(bus.write(0x64, &data));
        assert_eq!(b.lock().unwrap().writes, 1);
    }

    #[test]
    fn remove_needs_the_exact_range() {
        let bus = Bus::new();
        let d = probe();
        bus.insert(d.clone(), 0x70, 2).unwrap();
        assert_eq!(
            bus.remove(0x70, 1),
            Err(BusError::NotFound { base: 0x70, len: 1 })
        );
        assert_eq!(
            bus.remove(0x71, 1),
            Err(BusError::NotFound { base: 0x71, len: 1 })
        );
        bus.remove(0x70, 2).unwrap();
        assert!(!bus.write(0x70, &[0]));
        assert_eq!(
            bus.remove(0x70, 2),
            Err(BusError::NotFound { base: 0x70, len: 2 })
        );
        // The range is free again.
        bus.insert(d, 0x70, 2).unwrap();
    }

    #[test]
    fn dropped_device_is_unclaimed_and_its_range_reusable() {
        let bus = Bus::new();
        let d = probe();
        bus.insert(d.clone(), 0x80, 1).unwrap();
        assert!(bus.write(0x80, &[1]));
        drop(d);
        assert!(!bus.write(0x80, &[1]));
        let mut b = [0u8];
        assert!(!bus.read(0x80, &mut b));
        let e = probe();
        bus.insert(e.clone(), 0x80, 1).unwrap();
        assert!(bus.write(0x80, &[1]));
        assert_eq!(e.lock().unwrap().writes, 1);
    }

    #[test]
    fn poisoned_device_does_not_panic_the_caller() {
        let bus = Bus::new();
        let d = probe();
        bus.insert(d.clone(), 0x80, 1).unwrap();
        let poison = d.clone();
        let _ = thread::spawn(move || {
            let _guard = poison.lock().unwrap();
            panic!("poison the device mutex");
        })
        .join();
        assert!(d.is_poisoned());
        assert!(bus.write(0x80, &[7]));
        let mut b = [0u8];
        assert!(bus.read(0x80, &mut b));
        assert_eq!(b, [0x5a]);
    }

    #[test]
    fn concurrent_access_from_threads() {
        let bus = Arc::new(Bus::new());
        let devs: Vec<_> = (0..4).map(|_| probe()).collect();
        for (i, d) in devs.iter().enumerate() {
            bus.insert(d.clone(), 0x1000 * i as u64, 0x100).unwrap();
        }
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let bus = bus.clone();
                thread::spawn(move || {
                    for i in 0..1000u64 {
                        assert!(bus.write(0x1000 * ((t + i) % 4) + (i % 0xff), &[1, 2]));
                        let mut d = [0u8; 4];
                        assert!(bus.read(0x1000 * (i % 4), &mut d));
                    }
                })
            })
            .collect();
        // Insert and remove an unrelated device while the vCPU threads run.
        let extra = probe();
        for _ in 0..100 {
            bus.insert(extra.clone(), 0x10_0000, 0x10).unwrap();
            bus.remove(0x10_0000, 0x10).unwrap();
        }
        for t in threads {
            t.join().unwrap();
        }
        let total: u64 = devs.iter().map(|d| d.lock().unwrap().writes).sum();
        assert_eq!(total, 4000);
        for d in &devs {
            assert_eq!(d.lock().unwrap().writes, 1000);
        }
    }

    #[test]
    fn debug_lists_ranges() {
        let bus = Bus::new();
        let d = probe();
        bus.insert(d.clone(), 0x3f8, 8).unwrap();
        assert_eq!(format!("{bus:?}"), "[\"0x3f8+0x8\"]");
    }
}
