//! Helpers the fuzz targets share: access sizes as a guest picks them, and interrupt sinks that accept everything.

use libfuzzer_sys::arbitrary::{self, Arbitrary};

/// The width of one guest access: the valid ones and the ones a hostile guest (or a buggy bus) may still produce.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessSize {
    /// A byte.
    One,
    /// A word.
    Two,
    /// A dword.
    Four,
    /// A qword.
    Eight,
    /// An empty access.
    Zero,
    /// Three bytes.
    Three,
    /// Sixteen bytes.
    Sixteen,
}

impl AccessSize {
    /// The access length in bytes.
    pub fn len(self) -> usize {
        match self {
            Self::One => 1,
            Self::Two => 2,
            Self::Four => 4,
            Self::Eight => 8,
            Self::Zero => 0,
            Self::Three => 3,
            Self::Sixteen => 16,
        }
    }

    /// Whether the access is empty.
    pub fn is_empty(self) -> bool {
        self == Self::Zero
    }
}

/// `len` bytes of `value` in little-endian order, repeating it past 8 bytes.
pub fn value_bytes(value: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (value >> ((i % 8) * 8)) as u8).collect()
}

/// The little-endian value of up to 8 bytes.
pub fn bytes_value(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .take(8)
        .enumerate()
        .fold(0, |value, (i, byte)| value | u64::from(*byte) << (i * 8))
}

/// An MSI-X delivery that drops every message and route.
pub struct NoopMsiDelivery;

impl pci::MsiDelivery for NoopMsiDelivery {
    fn deliver(&self, _vector: u16, _address: u64, _data: u32) -> std::io::Result<()> {
        Ok(())
    }

    fn update_route(
        &self,
        _vector: u16,
        _address: u64,
        _data: u32,
        _masked: bool,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

/// An interrupt line connected to nothing.
pub struct NoopLine;

impl devices::InterruptLine for NoopLine {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn set_level(&self, _asserted: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// An MSI sender connected to nothing.
pub struct NoopMsiSender;

impl devices::MsiSender for NoopMsiSender {
    fn send_msi(&self, _address: u64, _data: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// A PIC output connected to nothing: no vCPU is kicked.
pub struct NoopPicOutput;

impl devices::PicOutput for NoopPicOutput {
    fn interrupt_requested(&self) {}
}

/// Platform events that go nowhere: power-off, reset and debug-exit requests are dropped.
pub struct NoopPlatformEvents;

impl devices::PlatformEvents for NoopPlatformEvents {
    fn power_off(&self) {}

    fn reset(&self) {}

    fn debug_exit(&self, _code: u8) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_round_trip() {
        assert_eq!(value_bytes(0x0102_0304, 4), [4, 3, 2, 1]);
        assert_eq!(value_bytes(0x0102, 3), [2, 1, 0]);
        assert_eq!(value_bytes(0xff, 9)[8], 0xff);
        assert_eq!(bytes_value(&[4, 3, 2, 1]), 0x0102_0304);
        assert_eq!(bytes_value(&[]), 0);
    }
}

/// A split virtqueue a hostile driver lays out in 1 MiB of guest RAM: a descriptor table, a second table for
/// indirect descriptors to point at, the available ring, and a data area holding the input's raw bytes.
pub mod hostile_queue {
    use libfuzzer_sys::arbitrary::{self, Arbitrary};
    use virtio_devices::GuestMemoryMmap;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    /// Guest RAM: 1 MiB at 0.
    pub const MEM_SIZE: u64 = 0x10_0000;
    /// The queue's descriptor table.
    pub const DESC_TABLE: u64 = 0x1000;
    /// The available ring.
    pub const AVAIL_RING: u64 = 0x2000;
    /// The used ring.
    pub const USED_RING: u64 = 0x3000;
    /// The input's second descriptor table (for indirect descriptors to point at).
    pub const INDIRECT_TABLE: u64 = 0x4000;
    /// Where the input's raw bytes (headers, data) go.
    pub const DATA: u64 = 0x8000;
    /// Size of a split-queue descriptor.
    pub const DESC_SIZE: u64 = 16;

    /// A guest address a descriptor can hold.
    #[derive(Arbitrary, Debug, Clone, Copy)]
    pub enum Addr {
        /// In the data area, which holds the input's bytes.
        Data(u16),
        /// Entry `n` of the descriptor table (so a buffer or indirect table aliases the ring).
        Table(u8),
        /// Entry `n` of the second table.
        Indirect(u8),
        /// `n` bytes before the end of guest memory.
        End(u16),
        /// Anywhere.
        Raw(u64),
    }

    impl Addr {
        /// The address this stands for.
        pub fn resolve(self) -> u64 {
            match self {
                Self::Data(offset) => DATA + u64::from(offset),
                Self::Table(index) => DESC_TABLE + DESC_SIZE * u64::from(index),
                Self::Indirect(index) => INDIRECT_TABLE + DESC_SIZE * u64::from(index),
                Self::End(back) => MEM_SIZE.wrapping_sub(u64::from(back)),
                Self::Raw(addr) => addr,
            }
        }
    }

    /// A descriptor length: a plausible one, or any 32-bit value.
    #[derive(Arbitrary, Debug, Clone, Copy)]
    pub enum Len {
        /// Up to 64 KiB.
        Small(u16),
        /// Anything.
        Raw(u32),
    }

    /// One descriptor as the driver writes it.
    #[derive(Arbitrary, Debug)]
    pub struct Desc {
        /// Buffer address.
        pub addr: Addr,
        /// Buffer length.
        pub len: Len,
        /// Raw flags: NEXT (1), WRITE (2), INDIRECT (4) and junk.
        pub flags: u16,
        /// Next descriptor index.
        pub next: u16,
    }

    impl Desc {
        /// The descriptor's 16 bytes.
        pub fn bytes(&self) -> [u8; DESC_SIZE as usize] {
            let len = match self.len {
                Len::Small(len) => u32::from(len),
                Len::Raw(len) => len,
            };
            let mut bytes = [0u8; DESC_SIZE as usize];
            bytes[..8].copy_from_slice(&self.addr.resolve().to_le_bytes());
            bytes[8..12].copy_from_slice(&len.to_le_bytes());
            bytes[12..14].copy_from_slice(&self.flags.to_le_bytes());
            bytes[14..16].copy_from_slice(&self.next.to_le_bytes());
            bytes
        }
    }

    /// Everything the driver controls about the queue.
    #[derive(Arbitrary, Debug)]
    pub struct QueueInput {
        /// log2 of the queue size (taken modulo 9: 1 to 256 entries).
        pub queue_size_log2: u8,
        /// The descriptor table.
        pub table: Vec<Desc>,
        /// The second table.
        pub indirect: Vec<Desc>,
        /// Head indexes in the available ring.
        pub heads: Vec<u16>,
        /// The available index; the number of heads when absent.
        pub avail_idx: Option<u16>,
        /// The data area's bytes.
        pub data: Vec<u8>,
    }

    fn write_table(mem: &GuestMemoryMmap, base: u64, descs: &[Desc], max: usize) {
        for (i, desc) in descs.iter().take(max).enumerate() {
            mem.write_slice(&desc.bytes(), GuestAddress(base + DESC_SIZE * i as u64))
                .unwrap();
        }
    }

    impl QueueInput {
        /// Guest memory laid out as the driver wrote it, and the ready queue over it.
        pub fn build(&self) -> (GuestMemoryMmap, Queue) {
            let mem =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
            let size = 1u16 << (self.queue_size_log2 % 9);
            write_table(&mem, DESC_TABLE, &self.table, usize::from(size));
            write_table(&mem, INDIRECT_TABLE, &self.indirect, 256);
            let data_len = self.data.len().min((MEM_SIZE - DATA) as usize);
            mem.write_slice(&self.data[..data_len], GuestAddress(DATA))
                .unwrap();
            let avail_idx = self.avail_idx.unwrap_or(self.heads.len() as u16);
            mem.write_obj(0u16, GuestAddress(AVAIL_RING)).unwrap();
            mem.write_obj(avail_idx, GuestAddress(AVAIL_RING + 2))
                .unwrap();
            for (i, head) in self.heads.iter().take(usize::from(size)).enumerate() {
                mem.write_obj(*head, GuestAddress(AVAIL_RING + 4 + 2 * i as u64))
                    .unwrap();
            }
            let mut queue = Queue::new(size).unwrap();
            queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
            queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
            queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
            queue.set_ready(true);
            assert!(queue.is_valid(&mem));
            (mem, queue)
        }
    }
}
