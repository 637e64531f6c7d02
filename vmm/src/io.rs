//! Routes a vCPU's port and MMIO accesses to the device buses. Accesses no device claims read as all-ones, are
//! ignored on write, and are counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::Bus;
use hypervisor::ExitHandler;

/// Counts of accesses no device claimed.
#[derive(Debug, Default)]
pub struct UnclaimedCounters {
    /// Port reads and writes.
    pub pio: AtomicU64,
    /// MMIO reads and writes.
    pub mmio: AtomicU64,
}

/// The port and MMIO buses, as the vCPUs see them.
pub struct IoDispatch {
    /// Port I/O bus.
    pub io_bus: Arc<Bus>,
    /// MMIO bus.
    pub mmio_bus: Arc<Bus>,
    /// Unclaimed-access counters.
    pub unclaimed: UnclaimedCounters,
}

impl IoDispatch {
    /// Creates a dispatcher over two buses.
    pub fn new(io_bus: Arc<Bus>, mmio_bus: Arc<Bus>) -> Self {
        IoDispatch {
            io_bus,
            mmio_bus,
            unclaimed: UnclaimedCounters::default(),
        }
    }

    fn miss(&self, counter: &AtomicU64, kind: &str, addr: u64, write: bool) {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        if n < 16 {
            tracing::debug!(
                "unclaimed {kind} {} at {addr:#x}",
                if write { "write" } else { "read" }
            );
        }
    }
}

impl ExitHandler for IoDispatch {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.io_bus.read(u64::from(port), data) {
            data.fill(0xff);
            self.miss(&self.unclaimed.pio, "port", u64::from(port), false);
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if !self.io_bus.write(u64::from(port), data) {
            self.miss(&self.unclaimed.pio, "port", u64::from(port), true);
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio_bus.read(addr, data) {
            data.fill(0xff);
            self.miss(&self.unclaimed.mmio, "MMIO", addr, false);
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.mmio_bus.write(addr, data) {
            self.miss(&self.unclaimed.mmio, "MMIO", addr, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    struct Fixed(u8);

    impl devices::BusDevice for Fixed {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    #[test]
    fn unclaimed_accesses_read_all_ones_and_are_counted() {
        let io = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let dev: Arc<Mutex<dyn devices::BusDevice>> = Arc::new(Mutex::new(Fixed(0x12)));
        io.insert(dev.clone(), 0x80, 1).unwrap();
        // The buses hold weak references: `dev` keeps the device alive for the test.
        mmio.insert(dev.clone(), 0x1000, 0x10).unwrap();
        let d = IoDispatch::new(io, mmio);

        let mut b = [0u8; 1];
        d.pio_read(0x80, &mut b);
        assert_eq!(b, [0x12]);
        d.pio_read(0x81, &mut b);
        assert_eq!(b, [0xff]);
        d.pio_write(0x82, &[1]);
        let mut w = [0u8; 4];
        d.mmio_read(0x1004, &mut w);
        assert_eq!(w, [0x12; 4]);
        d.mmio_read(0x2000, &mut w);
        assert_eq!(w, [0xff; 4]);

        assert_eq!(d.unclaimed.pio.load(Ordering::Relaxed), 2);
        assert_eq!(d.unclaimed.mmio.load(Ordering::Relaxed), 1);
    }
}
