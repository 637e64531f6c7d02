//! The fw_cfg DMA interface.
//!
//! The guest writes the guest-physical address of a 16-byte descriptor `{ be32 control, be32 length, be64 address }`
//! to the DMA address register. The device optionally selects an item (control bit [`CTL_SELECT`], key in the upper
//! 16 bits), then reads, skips or writes `length` bytes of it against guest memory at `address`, and finally stores
//! the control word back: 0 on success, [`CTL_ERROR`] on failure.
//!
//! Reads past the end of an item (or of a key with no item) fill guest memory with zeros, as QEMU does. A write must
//! fit inside the selected item; it is validated and then discarded (the device is read-only, see the module
//! documentation of [`super`]). A descriptor that cannot be read gets ERROR stored at its address if that is
//! writable. Nothing the guest puts in the descriptor can panic the device.

use super::{FwCfg, GuestMemoryError};

/// Control bit: the transfer failed (set by the device).
pub const CTL_ERROR: u32 = 0x01;
/// Control bit: copy item bytes to guest memory.
pub const CTL_READ: u32 = 0x02;
/// Control bit: advance the item offset without copying.
pub const CTL_SKIP: u32 = 0x04;
/// Control bit: select the item whose key is in bits 16..32 first.
pub const CTL_SELECT: u32 = 0x08;
/// Control bit: copy guest memory into the item.
pub const CTL_WRITE: u32 = 0x10;

/// Bytes of the DMA descriptor.
const DESCRIPTOR_LEN: usize = 16;
/// Largest piece of zeros written to the guest at once when a read runs past an item's end.
const ZERO_CHUNK: usize = 4096;

/// What the descriptor asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    Read,
    Write,
    Skip,
    None,
}

impl FwCfg {
    /// Runs the transfer described at guest-physical `descriptor` and stores the resulting control word there.
    pub(super) fn run_dma(&mut self, descriptor: u64) {
        let mut raw = [0u8; DESCRIPTOR_LEN];
        let fits = descriptor.checked_add(DESCRIPTOR_LEN as u64).is_some();
        if !fits || self.mem.read(descriptor, &mut raw).is_err() {
            tracing::debug!("fw_cfg: DMA descriptor at {descriptor:#x} is not in guest RAM");
            self.store_control(descriptor, CTL_ERROR);
            return;
        }
        let [c0, c1, c2, c3, l0, l1, l2, l3, a0, a1, a2, a3, a4, a5, a6, a7] = raw;
        let control = u32::from_be_bytes([c0, c1, c2, c3]);
        let length = u32::from_be_bytes([l0, l1, l2, l3]);
        let address = u64::from_be_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);

        if control & CTL_SELECT != 0 {
            // The key is the upper half of the control word.
            self.select((control >> 16) as u16);
        }
        let operation = if control & CTL_READ != 0 {
            Operation::Read
        } else if control & CTL_WRITE != 0 {
            Operation::Write
        } else if control & CTL_SKIP != 0 {
            Operation::Skip
        } else {
            Operation::None
        };
        let result = match operation {
            Operation::None => Ok(()),
            _ => self.transfer(operation, length, address),
        };
        let status = match result {
            Ok(()) => 0,
            Err(why) => {
                tracing::debug!(
                    "fw_cfg: DMA {operation:?} of {length:#x} bytes at {address:#x} failed: {why}"
                );
                CTL_ERROR
            }
        };
        self.store_control(descriptor, status);
    }

    /// Moves `length` bytes between the selected item and guest memory at `address`.
    fn transfer(
        &mut self,
        operation: Operation,
        length: u32,
        address: u64,
    ) -> Result<(), DmaError> {
        if length == 0 {
            return Ok(());
        }
        if address.checked_add(u64::from(length)).is_none() {
            return Err(DmaError::AddressOverflow);
        }
        let offset = self.offset as usize;
        let item_len = self.selected().map_or(0, <[u8]>::len);
        // Bytes that come from the item; the rest lies past its end.
        let available = item_len.saturating_sub(offset);
        let in_item = available.min(length as usize);
        match operation {
            Operation::Read => {
                if in_item > 0 {
                    let item = self.selected().unwrap_or_default();
                    let bytes = item.get(offset..offset + in_item).unwrap_or_default();
                    self.mem.write(address, bytes)?;
                }
                let zeros = length as usize - in_item;
                // `in_item` is at most `length`, so this stays within the range checked above.
                write_zeros(self, address + in_item as u64, zeros)?;
            }
            Operation::Write => {
                if in_item != length as usize {
                    return Err(DmaError::WritePastEnd);
                }
                // Validate the guest buffer, then drop it: items are read-only.
                let mut scratch = vec![0u8; in_item];
                self.mem.read(address, &mut scratch)?;
            }
            Operation::Skip | Operation::None => {}
        }
        // Items are below 4 GiB, so the offset (at most the item length) fits in 32 bits.
        self.offset = u32::try_from(offset + in_item).unwrap_or(u32::MAX);
        Ok(())
    }

    /// Stores `control` (big-endian) at the descriptor; a descriptor outside guest RAM gets nothing.
    fn store_control(&self, descriptor: u64, control: u32) {
        if self.mem.write(descriptor, &control.to_be_bytes()).is_err() {
            tracing::debug!("fw_cfg: cannot store the DMA status at {descriptor:#x}");
        }
    }
}

/// Fills `len` bytes of guest memory at `address` with zeros, a page at a time.
fn write_zeros(fw: &FwCfg, address: u64, len: usize) -> Result<(), DmaError> {
    let zeros = [0u8; ZERO_CHUNK];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK);
        fw.mem.write(address + done as u64, &zeros[..n])?;
        done += n;
    }
    Ok(())
}

/// Why a DMA transfer failed (logged; the guest sees only the ERROR bit).
#[derive(Debug, thiserror::Error)]
enum DmaError {
    #[error("the guest buffer runs past the end of the 64-bit address space")]
    AddressOverflow,
    #[error("a write must fit inside the selected item")]
    WritePastEnd,
    #[error(transparent)]
    Memory(#[from] GuestMemoryError),
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use super::*;

    const DESC: u64 = 0x100;
    const BUF: u64 = 0x200;
    const MEM_LEN: usize = 0x1000;

    fn setup() -> (FwCfg, Arc<TestMemory>) {
        let mem = TestMemory::new(MEM_LEN);
        let mut fw = FwCfg::new(mem.clone());
        fw.add_file("etc/data", (0u8..100).collect()).unwrap();
        (fw, mem)
    }

    fn descriptor(control: u32, length: u32, address: u64) -> Vec<u8> {
        let mut d = control.to_be_bytes().to_vec();
        d.extend_from_slice(&length.to_be_bytes());
        d.extend_from_slice(&address.to_be_bytes());
        d
    }

    /// Writes the descriptor at `at`, kicks the transfer in two halves as firmware does, returns the control word.
    fn dma_at(
        fw: &mut FwCfg,
        mem: &TestMemory,
        at: u64,
        control: u32,
        length: u32,
        address: u64,
    ) -> u32 {
        mem.put(at, &descriptor(control, length, address));
        fw.write(REG_DMA_HIGH, &((at >> 32) as u32).to_be_bytes());
        fw.write(REG_DMA_LOW, &(at as u32).to_be_bytes());
        u32::from_be_bytes(mem.bytes(at, 4).try_into().unwrap())
    }

    fn dma(fw: &mut FwCfg, mem: &TestMemory, control: u32, length: u32, address: u64) -> u32 {
        dma_at(fw, mem, DESC, control, length, address)
    }

    fn select(key: u16) -> u32 {
        CTL_SELECT | u32::from(key) << 16
    }

    #[test]
    fn select_and_read() {
        let (mut fw, mem) = setup();
        let status = dma(&mut fw, &mem, select(FW_CFG_SIGNATURE) | CTL_READ, 4, BUF);
        assert_eq!(status, 0);
        assert_eq!(mem.bytes(BUF, 4), b"QEMU");
        // The read advanced the offset: the data port continues after it.
        let key = fw.file_key("etc/data").unwrap();
        assert_eq!(dma(&mut fw, &mem, select(key) | CTL_READ, 10, BUF), 0);
        assert_eq!(mem.bytes(BUF, 10), (0u8..10).collect::<Vec<_>>());
        let mut b = [0u8];
        fw.read(REG_DATA, &mut b);
        assert_eq!(b, [10]);
        // Without SELECT, a read continues from the current offset.
        assert_eq!(dma(&mut fw, &mem, CTL_READ, 3, BUF), 0);
        assert_eq!(mem.bytes(BUF, 3), [11, 12, 13]);
    }

    #[test]
    fn skip_then_read() {
        let (mut fw, mem) = setup();
        let key = fw.file_key("etc/data").unwrap();
        assert_eq!(dma(&mut fw, &mem, select(key) | CTL_SKIP, 50, 0), 0);
        assert_eq!(fw.state().offset, 50);
        assert_eq!(dma(&mut fw, &mem, CTL_READ, 2, BUF), 0);
        assert_eq!(mem.bytes(BUF, 2), [50, 51]);
        // Skipping past the end stops at the end.
        assert_eq!(dma(&mut fw, &mem, CTL_SKIP, 1000, 0), 0);
        assert_eq!(fw.state().offset, 100);
    }

    #[test]
    fn read_past_end_fills_zeros() {
        let (mut fw, mem) = setup();
        let key = fw.file_key("etc/data").unwrap();
        mem.put(BUF, &[0xaa; 8]);
        assert_eq!(dma(&mut fw, &mem, select(key) | CTL_SKIP, 98, 0), 0);
        assert_eq!(dma(&mut fw, &mem, CTL_READ, 6, BUF), 0);
        assert_eq!(mem.bytes(BUF, 8), [98, 99, 0, 0, 0, 0, 0xaa, 0xaa]);
        // A key with no item reads as zeros too.
        mem.put(BUF, &[0xaa; 4]);
        assert_eq!(dma(&mut fw, &mem, select(0x0002) | CTL_READ, 4, BUF), 0);
        assert_eq!(mem.bytes(BUF, 4), [0; 4]);
    }

    #[test]
    fn select_only_and_zero_length() {
        let (mut fw, mem) = setup();
        assert_eq!(dma(&mut fw, &mem, select(FW_CFG_ID), 0, 0), 0);
        assert_eq!(fw.state().selector, FW_CFG_ID);
        // No operation bit: the length is ignored even if the address is bad.
        assert_eq!(
            dma(&mut fw, &mem, select(FW_CFG_SIGNATURE), 99, u64::MAX),
            0
        );
        assert_eq!(dma(&mut fw, &mem, CTL_READ, 0, u64::MAX), 0);
        assert_eq!(fw.state().offset, 0);
    }

    #[test]
    fn bad_buffer_address_sets_error() {
        let (mut fw, mem) = setup();
        let status = dma(
            &mut fw,
            &mem,
            select(FW_CFG_SIGNATURE) | CTL_READ,
            4,
            MEM_LEN as u64 - 2,
        );
        assert_eq!(status, CTL_ERROR);
        // Nothing was written at the end of memory.
        assert_eq!(mem.bytes(MEM_LEN as u64 - 2, 2), [0, 0]);
        assert_eq!(fw.state().offset, 0);
        let status = dma(
            &mut fw,
            &mem,
            select(FW_CFG_SIGNATURE) | CTL_READ,
            4,
            1 << 40,
        );
        assert_eq!(status, CTL_ERROR);
        // A zero fill past the end of RAM fails too.
        let status = dma(&mut fw, &mem, select(0x0002) | CTL_READ, 0x2000, 0);
        assert_eq!(status, CTL_ERROR);
    }

    #[test]
    fn length_overflow_sets_error() {
        let (mut fw, mem) = setup();
        let status = dma(
            &mut fw,
            &mem,
            select(FW_CFG_SIGNATURE) | CTL_READ,
            u32::MAX,
            u64::MAX - 10,
        );
        assert_eq!(status, CTL_ERROR);
        let status = dma(&mut fw, &mem, CTL_SKIP | CTL_READ, 2, u64::MAX);
        assert_eq!(status, CTL_ERROR);
        assert_eq!(fw.state().offset, 0);
    }

    #[test]
    fn incoming_error_bit_is_cleared() {
        let (mut fw, mem) = setup();
        assert_eq!(
            dma(
                &mut fw,
                &mem,
                CTL_ERROR | select(FW_CFG_ID) | CTL_READ,
                4,
                BUF
            ),
            0
        );
        assert_eq!(mem.bytes(BUF, 4), [3, 0, 0, 0]);
    }

    #[test]
    fn descriptor_outside_ram_is_ignored() {
        let (mut fw, mem) = setup();
        // Straddles the end of RAM: the descriptor cannot be read.
        let at = MEM_LEN as u64 - 8;
        mem.put(at, &[0x11; 8]);
        fw.write(REG_DMA_HIGH, &0u32.to_be_bytes());
        fw.write(REG_DMA_LOW, &(at as u32).to_be_bytes());
        // The control word is in RAM, so it gets ERROR; nothing else was touched.
        assert_eq!(mem.bytes(at, 8), [0, 0, 0, 1, 0x11, 0x11, 0x11, 0x11]);
        // Wholly outside RAM: nothing is stored, nothing fails.
        fw.write(REG_DMA_LOW, &0x10_0000u32.to_be_bytes());
        assert_eq!(fw.state().selector, 0);
        // At the top of the address space: no overflow.
        fw.write(REG_DMA_HIGH, &u32::MAX.to_be_bytes());
        fw.write(REG_DMA_LOW, &u32::MAX.to_be_bytes());
        assert_eq!(fw.state().selector, 0);
    }

    #[test]
    fn sixty_four_bit_address_write() {
        let (mut fw, mem) = setup();
        mem.put(
            DESC,
            &descriptor(select(FW_CFG_SIGNATURE) | CTL_READ, 4, BUF),
        );
        fw.write(REG_DMA_HIGH, &DESC.to_be_bytes());
        assert_eq!(mem.bytes(DESC, 4), [0; 4]);
        assert_eq!(mem.bytes(BUF, 4), b"QEMU");
    }

    #[test]
    fn writes_are_validated_then_discarded() {
        let (mut fw, mem) = setup();
        let key = fw.file_key("etc/data").unwrap();
        mem.put(BUF, &[0xee; 4]);
        assert_eq!(dma(&mut fw, &mem, select(key) | CTL_WRITE, 4, BUF), 0);
        assert_eq!(fw.state().offset, 4);
        assert_eq!(&fw.item(key).unwrap()[..5], [0, 1, 2, 3, 4]);
        // Past the end of the item, or without an item: error.
        assert_eq!(dma(&mut fw, &mem, CTL_WRITE, 97, BUF), CTL_ERROR);
        assert_eq!(
            dma(&mut fw, &mem, select(0x0002) | CTL_WRITE, 1, BUF),
            CTL_ERROR
        );
        // An unreadable guest buffer: error.
        assert_eq!(
            dma(&mut fw, &mem, select(key) | CTL_WRITE, 4, MEM_LEN as u64),
            CTL_ERROR
        );
    }
}
