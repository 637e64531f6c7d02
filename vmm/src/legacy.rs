//! The legacy PC parts firmware and boot loaders use, present when Atrium boots firmware: the 8259 PIC pair (its
//! output goes to vCPU 0 as ExtINT through LINT0, alongside KVM's split irqchip), the 8254 PIT with port 0x61 and the
//! A20/fast-reset port 0x92.

use std::sync::{Arc, Mutex};

use std::os::fd::RawFd;

use devices::pic::{pic_bus_devices, pic_irq_line, Pic, PicOutput};
use devices::pit::{pit_bus_devices, Pit};
use devices::port92::Port92;
use devices::PlatformEvents;
use devices::{Bus, BusDevice};

use crate::cpu::{ExtIntSource, VcpuKicker};
use crate::device_manager::DeviceError;

/// Ports of the 8259 pair and the ELCR.
const PIC_MASTER_PORT: u64 = 0x20;
const PIC_SLAVE_PORT: u64 = 0xa0;
const ELCR_PORT: u64 = 0x4d0;
/// Ports of the 8254 counters and control word.
const PIT_PORT: u64 = 0x40;
/// ISA IRQ of PIT channel 0.
const PIT_IRQ: u8 = 0;
/// System control port B (PIT channel 2 gate and output).
const PORT_B: u64 = 0x61;
/// System control port A (A20, fast reset).
const PORT_92: u64 = 0x92;

/// Wakes vCPU 0 when the PIC asks for attention.
struct KickBootVcpu(Arc<VcpuKicker>);

impl PicOutput for KickBootVcpu {
    fn interrupt_requested(&self) {
        self.0.kick();
    }
}

/// The PIC as vCPU 0's external interrupt source.
struct PicSource(Arc<Pic>);

impl ExtIntSource for PicSource {
    fn pending(&self) -> bool {
        self.0.has_interrupt()
    }

    fn acknowledge(&self) -> Option<u8> {
        self.0.acknowledge()
    }
}

/// The legacy PC devices of one VM.
pub struct LegacyPc {
    pic: Arc<Pic>,
    pit: Arc<Mutex<Pit>>,
    /// Devices the buses hold weakly.
    _owned: Vec<Arc<Mutex<dyn BusDevice>>>,
}

impl LegacyPc {
    /// Creates the devices and places them on the port I/O bus.
    pub fn new(
        io_bus: &Bus,
        kicker: Arc<VcpuKicker>,
        events: Arc<dyn PlatformEvents>,
    ) -> Result<Self, DeviceError> {
        let pic = Pic::new(Arc::new(KickBootVcpu(kicker)));
        let pit = Arc::new(Mutex::new(
            Pit::new(pic_irq_line(&pic, PIT_IRQ))
                .map_err(|e| DeviceError::Legacy(e.to_string()))?,
        ));
        let pic_ports = pic_bus_devices(&pic);
        let pit_ports = pit_bus_devices(&pit);
        let port92: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Port92::new(events)));
        let mut owned = Vec::new();
        for (device, base, len, name) in [
            (
                pic_ports.master,
                PIC_MASTER_PORT,
                devices::pic::PIC_RANGE_LEN,
                "8259 master",
            ),
            (
                pic_ports.slave,
                PIC_SLAVE_PORT,
                devices::pic::PIC_RANGE_LEN,
                "8259 slave",
            ),
            (
                pic_ports.elcr,
                ELCR_PORT,
                devices::pic::ELCR_RANGE_LEN,
                "ELCR",
            ),
            (
                pit_ports.counters,
                PIT_PORT,
                devices::pit::PIT_RANGE_LEN,
                "8254 PIT",
            ),
            (
                pit_ports.port_b,
                PORT_B,
                devices::pit::PORT_B_RANGE_LEN,
                "port 0x61",
            ),
            (
                port92,
                PORT_92,
                devices::port92::PORT92_RANGE_LEN,
                "port 0x92",
            ),
        ] {
            io_bus
                .insert(device.clone(), base, len)
                .map_err(|source| DeviceError::Bus { name, source })?;
            owned.push(device);
        }
        Ok(LegacyPc {
            pic,
            pit,
            _owned: owned,
        })
    }

    /// The PIT's timer, for the control loop to watch.
    pub fn timer_fd(&self) -> RawFd {
        self.pit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .timer_fd()
    }

    /// The PIT's timer fired: raise IRQ 0 and re-arm.
    pub fn handle_timer(&self) {
        self.pit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handle_timer();
    }

    /// The PIC as vCPU 0's external interrupt source.
    pub fn extint(&self) -> Arc<dyn ExtIntSource> {
        Arc::new(PicSource(self.pic.clone()))
    }
}
