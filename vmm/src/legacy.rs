//! The legacy PC parts firmware and boot loaders use, present when Atrium boots firmware: the 8259 PIC pair (its
//! output goes to vCPU 0 as ExtINT through LINT0, alongside KVM's split irqchip), the 8254 PIT with port 0x61 and the
//! A20/fast-reset port 0x92.

use std::sync::{Arc, Mutex};

use std::os::fd::RawFd;

use devices::pic::{pic_bus_devices, pic_irq_line, Pic, PicOutput};
use devices::pit::{pit_bus_devices, Pit};
use devices::port92::Port92;
use devices::PlatformEvents;
use devices::{Bus, BusDevice, InterruptLine};

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

/// An ISA IRQ line into the PIC that also kicks vCPU 0 whenever, after the change, the PIC still requests an
/// interrupt: a kick lost in the window before KVM_RUN is repeated on the line's next activity.
struct IsaIrqLine {
    line: Arc<dyn InterruptLine>,
    pic: Arc<Pic>,
    kicker: Arc<VcpuKicker>,
}

impl IsaIrqLine {
    fn kick_if_pending(&self) {
        if self.pic.has_interrupt() {
            self.kicker.kick();
        }
    }
}

impl InterruptLine for IsaIrqLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.line.trigger()?;
        self.kick_if_pending();
        Ok(())
    }

    fn set_level(&self, asserted: bool) -> std::io::Result<()> {
        self.line.set_level(asserted)?;
        self.kick_if_pending();
        Ok(())
    }
}

/// The legacy PC devices of one VM.
pub struct LegacyPc {
    pic: Arc<Pic>,
    pit: Arc<Mutex<Pit>>,
    kicker: Arc<VcpuKicker>,
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
        let pic = Pic::new(Arc::new(KickBootVcpu(kicker.clone())));
        let ports = pic_bus_devices(&pic);
        let mut owned = Vec::new();
        for (device, base, len, name) in [
            (
                ports.master,
                PIC_MASTER_PORT,
                devices::pic::PIC_RANGE_LEN,
                "8259 master",
            ),
            (
                ports.slave,
                PIC_SLAVE_PORT,
                devices::pic::PIC_RANGE_LEN,
                "8259 slave",
            ),
            (ports.elcr, ELCR_PORT, devices::pic::ELCR_RANGE_LEN, "ELCR"),
        ] {
            io_bus
                .insert(device.clone(), base, len)
                .map_err(|source| DeviceError::Bus { name, source })?;
            owned.push(device);
        }
        let mut legacy = LegacyPc {
            pit: Arc::new(Mutex::new(
                Pit::new(Arc::new(IsaIrqLine {
                    line: pic_irq_line(&pic, PIT_IRQ),
                    pic: pic.clone(),
                    kicker: kicker.clone(),
                }))
                .map_err(|e| DeviceError::Legacy(e.to_string()))?,
            )),
            pic,
            kicker,
            _owned: owned,
        };
        let pit_ports = pit_bus_devices(&legacy.pit);
        io_bus
            .insert(
                pit_ports.counters.clone(),
                PIT_PORT,
                devices::pit::PIT_RANGE_LEN,
            )
            .map_err(|source| DeviceError::Bus {
                name: "8254 PIT",
                source,
            })?;
        io_bus
            .insert(
                pit_ports.port_b.clone(),
                PORT_B,
                devices::pit::PORT_B_RANGE_LEN,
            )
            .map_err(|source| DeviceError::Bus {
                name: "port 0x61",
                source,
            })?;
        legacy._owned.push(pit_ports.counters);
        legacy._owned.push(pit_ports.port_b);

        let port92: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Port92::new(events)));
        io_bus
            .insert(port92.clone(), PORT_92, devices::port92::PORT92_RANGE_LEN)
            .map_err(|source| DeviceError::Bus {
                name: "port 0x92",
                source,
            })?;
        legacy._owned.push(port92);
        Ok(legacy)
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

    /// ISA IRQ `irq` of the PIC, as a line devices raise.
    pub fn isa_irq(&self, irq: u8) -> Arc<dyn InterruptLine> {
        Arc::new(IsaIrqLine {
            line: pic_irq_line(&self.pic, irq),
            pic: self.pic.clone(),
            kicker: self.kicker.clone(),
        })
    }

    /// The PIC as vCPU 0's external interrupt source.
    pub fn extint(&self) -> Arc<dyn ExtIntSource> {
        Arc::new(PicSource(self.pic.clone()))
    }
}
