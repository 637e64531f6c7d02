//! Register access sequences against the legacy platform devices: the 16550 UART (wired to IOAPIC pin 4, as COM1 is),
//! the CMOS RTC/NVRAM and the IOAPIC, plus host input to the UART, pin changes and EOIs.
//!
//! After every step: the IOAPIC's version register and read-only redirection bits are intact and no pin outside
//! its 24 is asserted or routed.

#![no_main]

use std::sync::{Arc, Mutex};

use atrium_fuzz::{value_bytes, AccessSize, NoopMsiSender};
use devices::cmos::Cmos;
use devices::ioapic::{Ioapic, IOAPIC_NUM_PINS};
use devices::serial::Serial;
use devices::BusDevice;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

/// COM1's IOAPIC pin.
const SERIAL_PIN: usize = 4;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Device {
    Serial,
    Cmos,
    Ioapic,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A raw access at `offset` from the device's base (the bus only passes in-range offsets; others test bounds).
    Access {
        device: Device,
        offset: u16,
        size: AccessSize,
        value: u64,
        write: bool,
    },
    /// An access at a far offset.
    FarAccess {
        device: Device,
        offset: u64,
        size: AccessSize,
        value: u64,
        write: bool,
    },
    /// CMOS: select `index`, then read or write it.
    CmosIndexed { index: u8, value: u8, write: bool },
    /// IOAPIC: select indirect register `register`, then read or write it through IOWIN.
    IoapicIndirect {
        register: u8,
        value: u32,
        write: bool,
    },
    /// Host input for the UART.
    SerialInput(Vec<u8>),
    /// A device drives an IOAPIC pin (pins past 23 do not exist).
    Pin { pin: u8, level: bool },
    /// The hypervisor reports an EOI for `vector`.
    Eoi(u8),
}

struct Platform {
    serial: Serial,
    cmos: Cmos,
    ioapic: Arc<Mutex<Ioapic>>,
}

impl Platform {
    fn new() -> Self {
        let ioapic = Arc::new(Mutex::new(Ioapic::new(Arc::new(NoopMsiSender))));
        Self {
            serial: Serial::new(Ioapic::pin(&ioapic, SERIAL_PIN), Box::new(std::io::sink())),
            cmos: Cmos::new(512 << 20, 0),
            ioapic,
        }
    }

    fn access(&mut self, device: Device, offset: u64, size: AccessSize, value: u64, write: bool) {
        let mut data = value_bytes(value, size.len());
        let mut ioapic;
        let target: &mut dyn BusDevice = match device {
            Device::Serial => &mut self.serial,
            Device::Cmos => &mut self.cmos,
            Device::Ioapic => {
                ioapic = self.ioapic.lock().unwrap();
                &mut *ioapic
            }
        };
        if write {
            target.write(offset, &data);
        } else {
            target.read(offset, &mut data);
        }
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Access {
                device,
                offset,
                size,
                value,
                write,
            } => self.access(device, u64::from(offset), size, value, write),
            Op::FarAccess {
                device,
                offset,
                size,
                value,
                write,
            } => self.access(device, offset, size, value, write),
            Op::CmosIndexed {
                index,
                value,
                write,
            } => {
                self.cmos.write(0, &[index]);
                let mut data = [value];
                if write {
                    self.cmos.write(1, &data);
                } else {
                    self.cmos.read(1, &mut data);
                }
            }
            Op::IoapicIndirect {
                register,
                value,
                write,
            } => {
                let mut ioapic = self.ioapic.lock().unwrap();
                ioapic.write(0x00, &u32::from(register).to_le_bytes());
                let mut data = value.to_le_bytes();
                if write {
                    ioapic.write(0x10, &data);
                } else {
                    ioapic.read(0x10, &mut data);
                }
            }
            Op::SerialInput(ref bytes) => {
                // A full FIFO or loopback mode refuses input; both are normal.
                let _ = self.serial.enqueue_input(bytes);
            }
            Op::Pin { pin, level } => {
                let line = Ioapic::pin(&self.ioapic, usize::from(pin % 32));
                // Pins past 23 fail, as they should.
                let _ = line.set_level(level);
            }
            Op::Eoi(vector) => self.ioapic.lock().unwrap().end_of_interrupt(vector),
        }
    }

    fn check(&mut self) {
        let mut ioapic = self.ioapic.lock().unwrap();
        let state = ioapic.state();
        assert_eq!(state.pin_levels >> IOAPIC_NUM_PINS, 0);
        assert_eq!(state.id & !0x0f00_0000, 0);
        for pin in IOAPIC_NUM_PINS..64 {
            assert!(ioapic.pin_msi(pin).is_none());
        }
        // The version register: 24 entries, version 0x20.
        let saved = ioapic.state().ioregsel;
        ioapic.write(0x00, &[1, 0, 0, 0]);
        let mut version = [0u8; 4];
        ioapic.read(0x10, &mut version);
        assert_eq!(u32::from_le_bytes(version), 0x0017_0020);
        ioapic.write(0x00, &[saved, 0, 0, 0]);
        assert_eq!(ioapic.state(), state);
        drop(ioapic);
        // The receive FIFO never holds more than it can.
        assert!(self.serial.state().in_buffer.len() <= 64);
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut platform = Platform::new();
    for op in &ops {
        platform.step(op);
        platform.check();
    }
});
