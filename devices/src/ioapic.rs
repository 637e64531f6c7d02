//! A user-space IOAPIC (version 0x20, 24 pins) for a split irqchip: the local APICs live in the hypervisor, and this
//! device turns each asserted pin into the MSI its redirection entry describes.
//!
//! MMIO registers (offsets from the base, 0xfec00000 on a PC; insert with [`IOAPIC_MMIO_LEN`]): IOREGSEL at 0x00
//! selects an indirect register, IOWIN at 0x10 reads or writes it, and the EOI register at 0x40 ends a
//! level-triggered interrupt by vector. Accesses narrower than 32 bits touch only their byte lanes.
//!
//! Pin levels are logical ("asserted"); the polarity bit of a redirection entry is stored but does not invert them.
//! Edge pins fire on a rising edge while unmasked (an edge on a masked pin is lost). Level pins fire while asserted,
//! unmasked and with remote IRR clear, and set remote IRR until the guest's EOI for that vector.
//!
//! With KVM's split irqchip the hypervisor only reports an EOI for a vector it knows belongs to a level-triggered
//! IOAPIC route, so the VMM should mirror each pin's message into its interrupt routing table:
//! [`MsiSender::route_changed`] says when a pin's message changes and [`Ioapic::pin_msi`] gives the current one.
//!
//! Lock order: a device may call into its [`IoapicPin`] while holding its own lock; the IOAPIC never calls back
//! into devices, only into its [`MsiSender`].

use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;
use crate::interrupt::{InterruptLine, MsiMessage, MsiSender};

/// Number of input pins.
pub const IOAPIC_NUM_PINS: usize = 24;
/// Length of the MMIO range to insert the IOAPIC with.
pub const IOAPIC_MMIO_LEN: u64 = 0x1000;

// MMIO registers.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const EOI: u64 = 0x40;

// Indirect registers.
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION: u8 = 0x10;

/// ID register: the APIC ID occupies bits 24..=27.
const ID_MASK: u32 = 0x0f00_0000;
/// Version register: highest redirection entry (23) in bits 16..=23, version 0x20.
const VERSION: u32 = ((IOAPIC_NUM_PINS as u32 - 1) << 16) | 0x20;

// Redirection entry fields.
const RTE_VECTOR_MASK: u64 = 0xff;
const RTE_DELIVERY_MODE_SHIFT: u32 = 8;
const RTE_DELIVERY_MODE_MASK: u64 = 0x7;
const RTE_DEST_MODE_LOGICAL: u64 = 1 << 11;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_TRIGGER_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
const RTE_DEST_SHIFT: u32 = 56;
/// Bits the guest cannot write.
const RTE_READ_ONLY: u64 = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR;
/// Delivery modes 3 and 6 are reserved.
const RESERVED_DELIVERY_MODES: [u64; 2] = [3, 6];

// MSI message fields.
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
const MSI_ADDRESS_DEST_SHIFT: u32 = 12;
const MSI_ADDRESS_DEST_MODE_LOGICAL: u64 = 1 << 2;
const MSI_DATA_LEVEL_ASSERT: u32 = 1 << 14;
const MSI_DATA_TRIGGER_LEVEL: u32 = 1 << 15;

/// All pins' bits in [`IoapicState::pin_levels`].
const PIN_BITS: u32 = (1 << IOAPIC_NUM_PINS) - 1;

/// The IOAPIC's registers and input levels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoapicState {
    /// The ID register (ID in bits 24..=27).
    pub id: u32,
    /// The register IOREGSEL selects.
    pub ioregsel: u8,
    /// The redirection table.
    pub redirection: [u64; IOAPIC_NUM_PINS],
    /// Which pins are asserted (bit n = pin n).
    pub pin_levels: u32,
}

impl Default for IoapicState {
    fn default() -> Self {
        IoapicState {
            id: 0,
            ioregsel: 0,
            // Every pin starts masked.
            redirection: [RTE_MASKED; IOAPIC_NUM_PINS],
            pin_levels: 0,
        }
    }
}

/// The user-space IOAPIC.
pub struct Ioapic {
    state: IoapicState,
    msi: Arc<dyn MsiSender>,
}

impl Ioapic {
    /// Creates an IOAPIC in its reset state (all pins masked) that delivers through `msi`.
    pub fn new(msi: Arc<dyn MsiSender>) -> Self {
        Ioapic {
            state: IoapicState::default(),
            msi,
        }
    }

    /// Rebuilds an IOAPIC from saved state, clearing bits no IOAPIC can hold. Nothing is delivered until a pin
    /// changes or an EOI arrives.
    pub fn from_state(state: &IoapicState, msi: Arc<dyn MsiSender>) -> Self {
        let mut state = state.clone();
        state.id &= ID_MASK;
        state.pin_levels &= PIN_BITS;
        for entry in &mut state.redirection {
            *entry &= !RTE_DELIVERY_STATUS;
        }
        Ioapic { state, msi }
    }

    /// The current state.
    pub fn state(&self) -> IoapicState {
        self.state.clone()
    }

    /// An [`InterruptLine`] that drives `pin` of `this` (e.g. COM1 on pin 4). A line for a pin the IOAPIC does
    /// not have returns an error on every use.
    pub fn pin(this: &Arc<Mutex<Ioapic>>, pin: usize) -> Arc<dyn InterruptLine> {
        if pin >= IOAPIC_NUM_PINS {
            tracing::warn!(
                "IOAPIC pin {pin} does not exist (0..{IOAPIC_NUM_PINS}); its interrupts will fail"
            );
        }
        Arc::new(IoapicPin {
            ioapic: this.clone(),
            pin,
        })
    }

    /// Sets the level of input `pin`: an unmasked edge pin fires on a rising edge, an unmasked level pin fires
    /// while asserted with remote IRR clear. Failures (a bad pin, a failed MSI) are logged.
    pub fn service_pin(&mut self, pin: usize, level: bool) {
        if let Err(e) = self.set_pin(pin, level) {
            tracing::warn!("IOAPIC pin {pin}: {e}");
        }
    }

    /// Ends a level-triggered interrupt: clears remote IRR of the level entries with `vector` and delivers again
    /// those whose pin is still asserted. The VMM calls it on the hypervisor's IOAPIC EOI exit.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..IOAPIC_NUM_PINS {
            let entry = self.state.redirection[pin];
            if entry & RTE_VECTOR_MASK == u64::from(vector)
                && entry & RTE_TRIGGER_LEVEL != 0
                && entry & RTE_REMOTE_IRR != 0
            {
                self.state.redirection[pin] &= !RTE_REMOTE_IRR;
                if let Err(e) = self.deliver_level(pin) {
                    tracing::warn!("IOAPIC pin {pin}: {e}");
                }
            }
        }
    }

    /// The MSI address and data `pin` currently sends, or `None` if the pin is masked or does not exist.
    pub fn pin_msi(&self, pin: usize) -> Option<MsiMessage> {
        let entry = *self.state.redirection.get(pin)?;
        (entry & RTE_MASKED == 0).then(|| msi_message(entry))
    }

    fn set_pin(&mut self, pin: usize, level: bool) -> std::io::Result<()> {
        if pin >= IOAPIC_NUM_PINS {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("IOAPIC pin {pin} does not exist; pins are 0..{IOAPIC_NUM_PINS}"),
            ));
        }
        let bit = 1u32 << pin;
        let was = self.state.pin_levels & bit != 0;
        if level {
            self.state.pin_levels |= bit;
        } else {
            self.state.pin_levels &= !bit;
        }
        let entry = self.state.redirection[pin];
        if entry & RTE_TRIGGER_LEVEL != 0 {
            self.deliver_level(pin)
        } else if level && !was && entry & RTE_MASKED == 0 {
            self.send(entry)
        } else {
            Ok(())
        }
    }

    /// Delivers a level pin if it is asserted, unmasked and not already in service.
    fn deliver_level(&mut self, pin: usize) -> std::io::Result<()> {
        let entry = self.state.redirection[pin];
        let asserted = self.state.pin_levels & (1 << pin) != 0;
        if !asserted || entry & (RTE_MASKED | RTE_REMOTE_IRR) != 0 {
            return Ok(());
        }
        self.send(entry)?;
        // Only an interrupt that went out can be EOI'd.
        self.state.redirection[pin] |= RTE_REMOTE_IRR;
        Ok(())
    }

    fn send(&self, entry: u64) -> std::io::Result<()> {
        let mode = (entry >> RTE_DELIVERY_MODE_SHIFT) & RTE_DELIVERY_MODE_MASK;
        if RESERVED_DELIVERY_MODES.contains(&mode) {
            tracing::debug!(
                "IOAPIC: not delivering entry {entry:#x} with reserved delivery mode {mode}"
            );
            return Ok(());
        }
        let msg = msi_message(entry);
        self.msi.send_msi(msg.address, msg.data)
    }

    fn read_indirect(&self) -> u32 {
        match self.state.ioregsel {
            REG_ID | REG_ARBITRATION => self.state.id,
            REG_VERSION => VERSION,
            index => match redirection_slot(index) {
                // Truncation picks the requested half.
                Some((pin, high)) => {
                    (self.state.redirection[pin] >> if high { 32 } else { 0 }) as u32
                }
                None => 0,
            },
        }
    }

    fn write_indirect(&mut self, value: u32) {
        match self.state.ioregsel {
            REG_ID => self.state.id = value & ID_MASK,
            REG_VERSION | REG_ARBITRATION => {}
            index => match redirection_slot(index) {
                Some((pin, high)) => self.write_redirection(pin, high, value),
                None => tracing::debug!("IOAPIC: ignoring a write to register {index:#x}"),
            },
        }
    }

    fn write_redirection(&mut self, pin: usize, high: bool, value: u32) {
        let old = self.state.redirection[pin];
        let (shift, half) = if high {
            (32, 0xffff_ffff_0000_0000)
        } else {
            (0, 0xffff_ffff)
        };
        let written = (old & !half) | (u64::from(value) << shift);
        let mut entry = (written & !RTE_READ_ONLY) | (old & RTE_READ_ONLY);
        // An edge-triggered entry has nothing in service.
        if entry & RTE_TRIGGER_LEVEL == 0 {
            entry &= !RTE_REMOTE_IRR;
        }
        self.state.redirection[pin] = entry;

        let route = |e: u64| (e & RTE_MASKED == 0).then(|| msi_message(e));
        if route(old) != route(entry) {
            self.msi.route_changed(pin, route(entry));
        }
        // Unmasking (or switching to level) a pin that is held asserted delivers it.
        if entry & RTE_TRIGGER_LEVEL != 0 {
            if let Err(e) = self.deliver_level(pin) {
                tracing::warn!("IOAPIC pin {pin}: {e}");
            }
        }
    }
}

/// The pin and half (high = bits 32..=63) a redirection register index selects.
fn redirection_slot(index: u8) -> Option<(usize, bool)> {
    let slot = usize::from(index.checked_sub(REG_REDIRECTION)?);
    let pin = slot / 2;
    (pin < IOAPIC_NUM_PINS).then_some((pin, slot % 2 == 1))
}

/// The MSI address and data of a redirection entry.
fn msi_message(entry: u64) -> MsiMessage {
    let dest = entry >> RTE_DEST_SHIFT;
    let mut address = MSI_ADDRESS_BASE | (dest << MSI_ADDRESS_DEST_SHIFT);
    if entry & RTE_DEST_MODE_LOGICAL != 0 {
        address |= MSI_ADDRESS_DEST_MODE_LOGICAL;
    }
    // Vector and delivery mode occupy the same bits 0..=10 in both formats.
    let mut data = (entry & 0x7ff) as u32 | MSI_DATA_LEVEL_ASSERT;
    if entry & RTE_TRIGGER_LEVEL != 0 {
        data |= MSI_DATA_TRIGGER_LEVEL;
    }
    MsiMessage { address, data }
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                *byte = 0;
                continue;
            };
            let value = match at & !3 {
                IOREGSEL => u32::from(self.state.ioregsel),
                IOWIN => self.read_indirect(),
                _ => 0,
            };
            *byte = value.to_le_bytes()[(at & 3) as usize];
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Split the access per 32-bit register and merge the written lanes into its current value.
        let mut done = 0;
        while done < data.len() {
            let Some(at) = offset.checked_add(done as u64) else {
                return;
            };
            let (register, lane) = (at & !3, (at & 3) as usize);
            let n = (4 - lane).min(data.len() - done);
            let current = match register {
                IOREGSEL => u32::from(self.state.ioregsel),
                IOWIN => self.read_indirect(),
                _ => 0,
            };
            let mut bytes = current.to_le_bytes();
            bytes[lane..lane + n].copy_from_slice(&data[done..done + n]);
            let value = u32::from_le_bytes(bytes);
            match register {
                IOREGSEL => self.state.ioregsel = value as u8,
                IOWIN => self.write_indirect(value),
                EOI => self.end_of_interrupt(value as u8),
                _ => tracing::debug!("IOAPIC: ignoring a write at offset {at:#x}"),
            }
            done += n;
        }
    }
}

impl std::fmt::Debug for Ioapic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ioapic")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// One IOAPIC input as an [`InterruptLine`], made by [`Ioapic::pin`].
pub struct IoapicPin {
    ioapic: Arc<Mutex<Ioapic>>,
    pin: usize,
}

impl IoapicPin {
    fn set(&self, level: bool) -> std::io::Result<()> {
        // The IOAPIC's state stays consistent even if a holder panicked.
        let mut ioapic = self.ioapic.lock().unwrap_or_else(|p| p.into_inner());
        ioapic.set_pin(self.pin, level)
    }
}

impl InterruptLine for IoapicPin {
    fn trigger(&self) -> std::io::Result<()> {
        let mut ioapic = self.ioapic.lock().unwrap_or_else(|p| p.into_inner());
        let sent = ioapic.set_pin(self.pin, true);
        let released = ioapic.set_pin(self.pin, false);
        sent.and(released)
    }

    fn set_level(&self, asserted: bool) -> std::io::Result<()> {
        self.set(asserted)
    }
}

impl std::fmt::Debug for IoapicPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoapicPin")
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        sent: Mutex<Vec<(u64, u32)>>,
        routes: Mutex<Vec<(usize, Option<MsiMessage>)>>,
    }

    impl MsiSender for Recorder {
        fn send_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
            self.sent.lock().unwrap().push((address, data));
            Ok(())
        }
        fn route_changed(&self, pin: usize, msi: Option<MsiMessage>) {
            self.routes.lock().unwrap().push((pin, msi));
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<(u64, u32)> {
            std::mem::take(&mut *self.sent.lock().unwrap())
        }
    }

    fn setup() -> (Ioapic, Arc<Recorder>) {
        let msi = Arc::new(Recorder::default());
        (Ioapic::new(msi.clone()), msi)
    }

    fn write_reg(io: &mut Ioapic, index: u8, value: u32) {
        io.write(IOREGSEL, &u32::from(index).to_le_bytes());
        io.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(io: &mut Ioapic, index: u8) -> u32 {
        io.write(IOREGSEL, &u32::from(index).to_le_bytes());
        let mut b = [0u8; 4];
        io.read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    fn program(io: &mut Ioapic, pin: usize, entry: u64) {
        let index = REG_REDIRECTION + 2 * pin as u8;
        write_reg(io, index + 1, (entry >> 32) as u32);
        write_reg(io, index, entry as u32);
    }

    fn entry(io: &mut Ioapic, pin: usize) -> u64 {
        let index = REG_REDIRECTION + 2 * pin as u8;
        u64::from(read_reg(io, index)) | (u64::from(read_reg(io, index + 1)) << 32)
    }

    #[test]
    fn id_version_and_arbitration() {
        let (mut io, _msi) = setup();
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0020);
        write_reg(&mut io, REG_VERSION, 0);
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0020);
        write_reg(&mut io, REG_ID, 0xffff_ffff);
        assert_eq!(read_reg(&mut io, REG_ID), 0x0f00_0000);
        assert_eq!(read_reg(&mut io, REG_ARBITRATION), 0x0f00_0000);
        // Unimplemented indirect registers read as zero.
        assert_eq!(read_reg(&mut io, 0x03), 0);
        assert_eq!(read_reg(&mut io, REG_REDIRECTION + 48), 0);
        let mut sel = [0u8; 4];
        io.read(IOREGSEL, &mut sel);
        assert_eq!(sel, [REG_REDIRECTION + 48, 0, 0, 0]);
    }

    #[test]
    fn redirection_entries_respect_read_only_bits() {
        let (mut io, msi) = setup();
        for pin in 0..IOAPIC_NUM_PINS {
            assert_eq!(entry(&mut io, pin), RTE_MASKED, "pin {pin} starts masked");
        }
        program(&mut io, 7, 0xff00_0000_0001_ffff);
        // Delivery status (12) and remote IRR (14) stay clear.
        assert_eq!(entry(&mut io, 7), 0xff00_0000_0001_afff);
        program(&mut io, 23, 0x0300_0000_0000_0040);
        assert_eq!(entry(&mut io, 23), 0x0300_0000_0000_0040);
        assert_eq!(entry(&mut io, 22), RTE_MASKED);
        assert!(msi.take().is_empty());
    }

    #[test]
    fn msi_message_from_a_known_entry() {
        let (mut io, msi) = setup();
        // Vector 0x31, lowest priority, logical destination 0x05, edge.
        program(&mut io, 4, (0x05 << 56) | (1 << 11) | (1 << 8) | 0x31);
        assert_eq!(
            io.pin_msi(4),
            Some(MsiMessage {
                address: 0xfee0_5004,
                data: 0x4131
            })
        );
        io.service_pin(4, true);
        assert_eq!(msi.take(), [(0xfee0_5004, 0x4131)]);
        // Physical destination 3, fixed, level.
        program(&mut io, 9, (0x03 << 56) | RTE_TRIGGER_LEVEL | 0x40);
        io.service_pin(9, true);
        assert_eq!(msi.take(), [(0xfee0_3000, 0xc040)]);
    }

    #[test]
    fn edge_pin_fires_on_rising_edges_only() {
        let (mut io, msi) = setup();
        program(&mut io, 4, 0x24);
        io.service_pin(4, true);
        io.service_pin(4, true);
        io.service_pin(4, false);
        io.service_pin(4, true);
        assert_eq!(msi.take().len(), 2);
        // EOI does nothing for edge pins.
        io.end_of_interrupt(0x24);
        assert!(msi.take().is_empty());
    }

    #[test]
    fn masked_pin_sends_nothing() {
        let (mut io, msi) = setup();
        io.service_pin(1, true);
        io.service_pin(1, false);
        program(&mut io, 2, RTE_MASKED | RTE_TRIGGER_LEVEL | 0x30);
        io.service_pin(2, true);
        io.end_of_interrupt(0x30);
        assert!(msi.take().is_empty());
        assert_eq!(io.pin_msi(2), None);
        // Unmasking the asserted level pin fires it; an edge seen while masked is lost.
        program(&mut io, 2, RTE_TRIGGER_LEVEL | 0x30);
        assert_eq!(msi.take(), [(0xfee0_0000, 0xc030)]);
        program(&mut io, 1, 0x31);
        assert!(msi.take().is_empty());
    }

    #[test]
    fn level_pin_waits_for_eoi_and_resends_while_asserted() {
        let (mut io, msi) = setup();
        program(&mut io, 10, RTE_TRIGGER_LEVEL | 0x50);
        io.service_pin(10, true);
        assert_eq!(msi.take().len(), 1);
        assert_ne!(entry(&mut io, 10) & RTE_REMOTE_IRR, 0);
        // Still in service: no new message.
        io.service_pin(10, true);
        io.end_of_interrupt(0x51);
        assert!(msi.take().is_empty());
        // EOI with the line still asserted delivers again.
        io.end_of_interrupt(0x50);
        assert_eq!(msi.take().len(), 1);
        assert_ne!(entry(&mut io, 10) & RTE_REMOTE_IRR, 0);
        // The guest serviced the device: line low, then EOI through the EOI register.
        io.service_pin(10, false);
        io.write(EOI, &0x50u32.to_le_bytes());
        assert!(msi.take().is_empty());
        assert_eq!(entry(&mut io, 10) & RTE_REMOTE_IRR, 0);
        io.service_pin(10, true);
        assert_eq!(msi.take().len(), 1);
    }

    #[test]
    fn switching_to_edge_clears_remote_irr() {
        let (mut io, msi) = setup();
        program(&mut io, 3, RTE_TRIGGER_LEVEL | 0x40);
        io.service_pin(3, true);
        assert_ne!(entry(&mut io, 3) & RTE_REMOTE_IRR, 0);
        program(&mut io, 3, 0x40);
        assert_eq!(entry(&mut io, 3) & RTE_REMOTE_IRR, 0);
        assert_eq!(msi.take().len(), 1);
    }

    #[test]
    fn reserved_delivery_modes_are_not_sent() {
        let (mut io, msi) = setup();
        program(&mut io, 5, (3 << 8) | 0x40);
        io.service_pin(5, true);
        program(&mut io, 6, (4 << 8) | 0x40); // NMI is fine
        io.service_pin(6, true);
        assert_eq!(msi.take(), [(0xfee0_0000, 0x4440)]);
    }

    #[test]
    fn narrow_accesses_touch_only_their_lanes() {
        let (mut io, _msi) = setup();
        program(&mut io, 0, 0x0000_0000_0001_0020);
        // Byte write of IOREGSEL, then a byte write to the vector lane of IOWIN.
        io.write(IOREGSEL, &[REG_REDIRECTION]);
        io.write(IOWIN, &[0x77]);
        assert_eq!(entry(&mut io, 0), 0x0000_0000_0001_0077);
        // Upper half-word: clear the mask bit (bit 16) only.
        io.write(IOREGSEL, &[REG_REDIRECTION]);
        io.write(IOWIN + 2, &[0x00, 0x00]);
        assert_eq!(entry(&mut io, 0), 0x77);
        io.write(IOREGSEL, &[REG_VERSION]);
        let mut b = [0u8; 2];
        io.read(IOWIN + 2, &mut b);
        assert_eq!(b, [0x17, 0x00]);
        // Unknown offsets and offsets near the top of the address space are harmless.
        io.write(0x20, &[1, 2, 3, 4]);
        io.write(u64::MAX, &[1, 2]);
        io.read(u64::MAX, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn route_changes_are_reported() {
        let (mut io, msi) = setup();
        program(&mut io, 4, 0x24);
        program(&mut io, 4, 0x24);
        program(&mut io, 4, RTE_MASKED | 0x24);
        assert_eq!(
            *msi.routes.lock().unwrap(),
            [
                (
                    4,
                    Some(MsiMessage {
                        address: 0xfee0_0000,
                        data: 0x4024
                    })
                ),
                (4, None)
            ]
        );
    }

    #[test]
    fn interrupt_line_drives_the_pin() {
        let msi = Arc::new(Recorder::default());
        let io = Arc::new(Mutex::new(Ioapic::new(msi.clone())));
        program(&mut io.lock().unwrap(), 4, 0x24);
        program(&mut io.lock().unwrap(), 11, RTE_TRIGGER_LEVEL | 0x25);
        let com1 = Ioapic::pin(&io, 4);
        com1.trigger().unwrap();
        com1.trigger().unwrap();
        assert_eq!(msi.take().len(), 2);
        assert_eq!(io.lock().unwrap().state().pin_levels, 0);

        let level = Ioapic::pin(&io, 11);
        level.set_level(true).unwrap();
        assert_eq!(msi.take().len(), 1);
        level.set_level(false).unwrap();
        io.lock().unwrap().end_of_interrupt(0x25);
        assert!(msi.take().is_empty());

        let bogus = Ioapic::pin(&io, IOAPIC_NUM_PINS);
        assert_eq!(
            bogus.trigger().unwrap_err().kind(),
            std::io::ErrorKind::InvalidInput
        );
        assert!(bogus.set_level(true).is_err());
    }

    #[test]
    fn failed_msi_leaves_the_level_pin_deliverable() {
        struct Failing;
        impl MsiSender for Failing {
            fn send_msi(&self, _address: u64, _data: u32) -> std::io::Result<()> {
                Err(std::io::Error::other("no route"))
            }
        }
        let io = Arc::new(Mutex::new(Ioapic::new(Arc::new(Failing))));
        program(&mut io.lock().unwrap(), 2, RTE_TRIGGER_LEVEL | 0x30);
        let line = Ioapic::pin(&io, 2);
        assert!(line.set_level(true).is_err());
        assert_eq!(
            io.lock().unwrap().state().redirection[2] & RTE_REMOTE_IRR,
            0
        );
    }

    #[test]
    fn state_round_trip() {
        let (mut io, msi) = setup();
        write_reg(&mut io, REG_ID, 0x0200_0000);
        program(&mut io, 8, RTE_TRIGGER_LEVEL | 0x60);
        io.service_pin(8, true);
        let state = io.state();
        let restored = Ioapic::from_state(&state, msi.clone());
        assert_eq!(restored.state(), state);

        let mut odd = state.clone();
        odd.id = 0xffff_ffff;
        odd.pin_levels = u32::MAX;
        odd.redirection[0] |= RTE_DELIVERY_STATUS;
        let cleaned = Ioapic::from_state(&odd, msi).state();
        assert_eq!(cleaned.id, 0x0f00_0000);
        assert_eq!(cleaned.pin_levels, PIN_BITS);
        assert_eq!(cleaned.redirection[0] & RTE_DELIVERY_STATUS, 0);
    }
}
