//! MSI-X table and PBA accesses, message control writes and device triggers against `pci::MsixConfig`.
//!
//! Besides "no panic", every step is checked against a small model of the table: reads return what the model says,
//! a vector is never left pending while it could be delivered, and every message sent was unmasked and carried the
//! vector's current address and data.

#![no_main]

use std::sync::{Arc, Mutex};

use atrium_fuzz::{bytes_value, value_bytes, AccessSize};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pci::{
    MsiDelivery, MsixConfig, MsixTrigger, MAX_MSIX_VECTORS, MSIX_ENABLE, MSIX_FUNCTION_MASK,
    MSIX_TABLE_ENTRY_SIZE,
};

#[derive(Arbitrary, Debug)]
enum Op {
    ReadTable {
        offset: u16,
        size: AccessSize,
    },
    WriteTable {
        offset: u16,
        size: AccessSize,
        value: u64,
    },
    /// An access far outside the table.
    FarTable {
        offset: u64,
        size: AccessSize,
        value: u64,
        write: bool,
    },
    ReadPba {
        offset: u16,
        size: AccessSize,
    },
    WritePba {
        offset: u64,
        size: AccessSize,
        value: u64,
    },
    MessageControl(u16),
    Trigger(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    vectors: u16,
    ops: Vec<Op>,
}

/// Records every message and route update.
#[derive(Default)]
struct Recorder {
    delivered: Mutex<Vec<(u16, u64, u32)>>,
    routes: Mutex<Vec<u16>>,
}

impl MsiDelivery for Recorder {
    fn deliver(&self, vector: u16, address: u64, data: u32) -> std::io::Result<()> {
        self.delivered.lock().unwrap().push((vector, address, data));
        Ok(())
    }

    fn update_route(
        &self,
        vector: u16,
        _address: u64,
        _data: u32,
        _masked: bool,
    ) -> std::io::Result<()> {
        self.routes.lock().unwrap().push(vector);
        Ok(())
    }
}

/// What the guest should read back: the table as dwords.
struct Model {
    table: Vec<[u32; 4]>,
}

impl Model {
    fn new(vectors: u16) -> Self {
        // Reset state: everything zero, every vector masked.
        Self {
            table: vec![[0, 0, 0, 1]; usize::from(vectors)],
        }
    }

    fn table_bytes(&self) -> u64 {
        self.table.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Whether an access of `len` bytes at `offset` is one the table serves.
    fn valid(&self, offset: u64, len: usize) -> bool {
        let len = len as u64;
        matches!(len, 4 | 8) && offset.is_multiple_of(len) && offset < self.table_bytes()
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        if !self.valid(offset, len) {
            return vec![0xff; len];
        }
        let entry = &self.table[(offset / MSIX_TABLE_ENTRY_SIZE) as usize];
        let first = ((offset % MSIX_TABLE_ENTRY_SIZE) / 4) as usize;
        let mut value = u64::from(entry[first]);
        if len == 8 {
            value |= u64::from(entry[first + 1]) << 32;
        }
        value_bytes(value, len)
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !self.valid(offset, data.len()) {
            return;
        }
        let entry = &mut self.table[(offset / MSIX_TABLE_ENTRY_SIZE) as usize];
        let first = ((offset % MSIX_TABLE_ENTRY_SIZE) / 4) as usize;
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let value = bytes_value(chunk) as u32;
            let dword = first + i;
            entry[dword] = match dword {
                0 => value & !3,
                3 => value & 1,
                _ => value,
            };
        }
    }
}

fn check(msix: &MsixConfig, model: &Model, recorder: &Recorder) {
    let blocked = |vector: u16| {
        !msix.enabled() || msix.function_masked() || msix.entry(vector).unwrap().masked()
    };
    for vector in 0..msix.num_vectors() {
        let entry = msix.entry(vector).unwrap();
        let expected = model.table[usize::from(vector)];
        assert_eq!(
            [
                entry.msg_addr_lo,
                entry.msg_addr_hi,
                entry.msg_data,
                entry.vector_ctl
            ],
            expected,
            "vector {vector}"
        );
        assert!(
            !msix.is_pending(vector) || blocked(vector),
            "vector {vector} is pending but deliverable"
        );
    }
    assert!(!msix.is_pending(msix.num_vectors()));
    for (vector, address, data) in recorder.delivered.lock().unwrap().drain(..) {
        let entry = msix
            .entry(vector)
            .unwrap_or_else(|| panic!("delivered vector {vector} past the table"));
        assert!(!blocked(vector), "delivered masked vector {vector}");
        assert_eq!((address, data), (entry.address(), entry.msg_data));
    }
    for vector in recorder.routes.lock().unwrap().drain(..) {
        assert!(vector < msix.num_vectors(), "route for vector {vector}");
    }
}

fuzz_target!(|input: Input| {
    let vectors = input.vectors % (MAX_MSIX_VECTORS + 1);
    let recorder = Arc::new(Recorder::default());
    let Ok(mut msix) = MsixConfig::new(vectors, recorder.clone()) else {
        assert_eq!(vectors, 0);
        return;
    };
    assert_eq!(msix.pba_size_bytes(), u64::from(vectors).div_ceil(64) * 8);
    let mut model = Model::new(vectors);
    for op in input.ops {
        match op {
            Op::ReadTable { offset, size } => {
                let mut data = vec![0u8; size.len()];
                msix.read_table(u64::from(offset), &mut data);
                assert_eq!(data, model.read(u64::from(offset), size.len()));
            }
            Op::WriteTable {
                offset,
                size,
                value,
            } => {
                let data = value_bytes(value, size.len());
                msix.write_table(u64::from(offset), &data);
                model.write(u64::from(offset), &data);
            }
            Op::FarTable {
                offset,
                size,
                value,
                write,
            } => {
                let mut data = value_bytes(value, size.len());
                if write {
                    msix.write_table(offset, &data);
                    model.write(offset, &data);
                } else {
                    msix.read_table(offset, &mut data);
                    assert_eq!(data, model.read(offset, size.len()));
                }
            }
            Op::ReadPba { offset, size } => {
                let offset = u64::from(offset);
                let mut data = vec![0u8; size.len()];
                msix.read_pba(offset, &mut data);
                let len = size.len() as u64;
                if matches!(len, 4 | 8)
                    && offset.is_multiple_of(len)
                    && offset < msix.pba_size_bytes()
                {
                    for (i, byte) in data.iter().enumerate() {
                        for bit in 0..8 {
                            let vector = (offset + i as u64) * 8 + bit;
                            let pending = u16::try_from(vector).is_ok_and(|v| msix.is_pending(v));
                            assert_eq!(byte >> bit & 1 == 1, pending, "PBA bit {vector}");
                        }
                    }
                } else {
                    assert!(data.iter().all(|&byte| byte == 0xff));
                }
            }
            Op::WritePba {
                offset,
                size,
                value,
            } => {
                let before = msix.state();
                msix.write_pba(offset, &value_bytes(value, size.len()));
                assert_eq!(msix.state(), before, "the PBA is read-only");
            }
            Op::MessageControl(control) => {
                msix.set_message_control(control);
                assert_eq!(msix.enabled(), control & MSIX_ENABLE != 0);
                assert_eq!(msix.function_masked(), control & MSIX_FUNCTION_MASK != 0);
            }
            Op::Trigger(vector) => {
                let was_enabled = msix.enabled();
                match msix.trigger(vector) {
                    Ok(MsixTrigger::Delivered) => assert!(was_enabled),
                    Ok(MsixTrigger::Pending) => assert!(msix.is_pending(vector)),
                    Ok(MsixTrigger::Disabled) => assert!(!was_enabled),
                    Err(_) => assert!(vector >= vectors),
                }
            }
        }
        check(&msix, &model, &recorder);
    }
});
