//! A PC's pair of cascaded 8259A programmable interrupt controllers and the edge/level control register (ELCR).
//!
//! The master handles ISA IRQs 0-7, the slave IRQs 8-15, and the slave's interrupt output drives the master's
//! input 2. The bus devices from [`pic_bus_devices`] go at the PC addresses: the master's command/data ports at
//! 0x20 (two ports), the slave's at 0xa0 (two ports) and the ELCR at 0x4d0 (two ports, master then slave).
//!
//! What is modelled: the ICW1..ICW4 initialisation sequence (vector base, single or cascade, ICW4 needed, auto-EOI),
//! OCW1 (the mask), OCW2 (non-specific and specific EOI; the rotate-on-EOI variants act as plain EOIs, the other
//! rotation and priority commands are ignored), OCW3 (IRR/ISR read select and the poll command; special mask mode is
//! recorded but has no effect). Priorities are fixed: the lowest IRQ number wins, and an IRQ is only delivered while
//! nothing of equal or higher priority is in service. Special fully nested mode is recorded and ignored, and the
//! cascade is always on the master's IRQ2 (as on every PC), whatever ICW1 and ICW3 say.
//!
//! Trigger mode comes from the ELCR, as on PIIX chipsets; ICW1's LTIM bit is ignored. An edge-triggered input
//! latches its IRR bit on a rising edge and keeps it until the interrupt is acknowledged; a level-triggered input's
//! IRR bit follows the line. The ELCR bits of IRQs 0, 1, 2, 8 and 13 always read as zero. The master's IRQ2 input
//! follows the slave's output level.
//!
//! A chip reports no interrupt until it has been initialised (ICW1 to the last ICW), and [`Pic::acknowledge`]
//! returns `None` until then: an uninitialised 8259's vectors are undefined.
//!
//! Lock order: [`Pic`] has an internal lock that it releases before calling its [`PicOutput`]; a device may drive a
//! PIC input (through [`pic_irq_line`]) while holding its own lock, and the PIC never calls back into devices.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;

/// Number of ISA IRQ inputs across both chips.
pub const PIC_NUM_IRQS: u8 = 16;
/// Length of each chip's port range (command at offset 0, data at offset 1).
pub const PIC_RANGE_LEN: u64 = 2;
/// Length of the ELCR's port range (master's IRQs at offset 0, slave's at offset 1).
pub const ELCR_RANGE_LEN: u64 = 2;

/// The master input the slave is cascaded on.
const CASCADE_IRQ: u8 = 2;
/// The IRQ whose vector an 8259 sends when nothing is pending at acknowledge time.
const SPURIOUS_IRQ: u8 = 7;

/// ELCR bits a guest can set: IRQs 0, 1 and 2 are always edge-triggered on the master...
const MASTER_ELCR_WRITABLE: u8 = 0xf8;
/// ...and IRQs 8 and 13 on the slave.
const SLAVE_ELCR_WRITABLE: u8 = 0xde;

// Command port (offset 0) writes.
const ICW1: u8 = 0x10;
const ICW1_NEED_ICW4: u8 = 0x01;
const ICW1_SINGLE: u8 = 0x02;
const OCW3: u8 = 0x08;
const OCW3_POLL: u8 = 0x04;
const OCW3_READ_REGISTER: u8 = 0x02;
const OCW3_READ_ISR: u8 = 0x01;
const OCW3_SET_SPECIAL_MASK: u8 = 0x40;
const OCW3_SPECIAL_MASK: u8 = 0x20;
const OCW2_COMMAND_SHIFT: u32 = 5;
const OCW2_NON_SPECIFIC_EOI: u8 = 0b001;
const OCW2_SPECIFIC_EOI: u8 = 0b011;
const OCW2_ROTATE_NON_SPECIFIC_EOI: u8 = 0b101;
const OCW2_ROTATE_SPECIFIC_EOI: u8 = 0b111;
const OCW2_LEVEL_MASK: u8 = 0x07;

// ICW2 and ICW4.
const ICW2_VECTOR_MASK: u8 = 0xf8;
const ICW4_AUTO_EOI: u8 = 0x02;
const ICW4_SPECIAL_FULLY_NESTED: u8 = 0x10;

/// The poll command's answer: bit 7 says an interrupt was pending, bits 0..=2 give its level.
const POLL_INTERRUPT: u8 = 0x80;

// Offsets.
const COMMAND_OFFSET: u64 = 0;
const DATA_OFFSET: u64 = 1;

/// Where a chip is in its initialisation sequence: which word its data port expects next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PicInitStep {
    /// Initialised (or never initialised): data port writes set the mask (OCW1).
    #[default]
    Ready,
    /// ICW1 was written; ICW2 (the vector base) comes next.
    Icw2,
    /// ICW3 (the cascade wiring) comes next.
    Icw3,
    /// ICW4 (the mode) comes next.
    Icw4,
}

/// One 8259A's registers and input levels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PicChipState {
    /// Interrupt request register (bit n = input n).
    pub irr: u8,
    /// In-service register.
    pub isr: u8,
    /// Interrupt mask register.
    pub imr: u8,
    /// Input line levels (for edge detection; the master's bit 2 mirrors the slave's output).
    pub lines: u8,
    /// Edge/level control: a set bit makes that input level-triggered.
    pub elcr: u8,
    /// The vector of input 0 (ICW2; a multiple of 8).
    pub vector_base: u8,
    /// The next initialisation word the data port expects.
    pub init_step: PicInitStep,
    /// A complete initialisation sequence has been written since reset.
    pub initialized: bool,
    /// ICW1 asked for an ICW4.
    pub icw4_needed: bool,
    /// ICW1 said single (no ICW3 follows); the cascade stays wired regardless.
    pub single: bool,
    /// ICW4 auto-EOI: acknowledging does not set the in-service bit.
    pub auto_eoi: bool,
    /// ICW4 special fully nested mode (recorded, no effect).
    pub special_fully_nested: bool,
    /// OCW3 special mask mode (recorded, no effect).
    pub special_mask: bool,
    /// OCW3 register select: the command port reads the ISR (`true`) or the IRR (`false`).
    pub read_isr: bool,
    /// OCW3 poll command: the next command port read polls.
    pub poll: bool,
}

impl Default for PicChipState {
    fn default() -> Self {
        PicChipState {
            irr: 0,
            isr: 0,
            // Everything masked until the guest programs the chip.
            imr: 0xff,
            lines: 0,
            elcr: 0,
            vector_base: 0,
            init_step: PicInitStep::Ready,
            initialized: false,
            icw4_needed: false,
            single: false,
            auto_eoi: false,
            special_fully_nested: false,
            special_mask: false,
            read_isr: false,
            poll: false,
        }
    }
}

/// Both chips' state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PicState {
    /// The master (IRQs 0-7, ports 0x20/0x21, ELCR 0x4d0).
    pub master: PicChipState,
    /// The slave (IRQs 8-15, ports 0xa0/0xa1, ELCR 0x4d1).
    pub slave: PicChipState,
}

/// Told when the PIC's interrupt output (INT of the master) goes from low to high; the VMM kicks vCPU 0 so that it
/// checks [`Pic::has_interrupt`] and injects the vector from [`Pic::acknowledge`].
///
/// Called without the PIC's lock held, possibly from a vCPU thread or with the lock of the device that raised the
/// IRQ held: an implementation must only record the request and wake vCPU 0, never lock a device.
pub trait PicOutput: Send + Sync {
    /// The PIC's output went from low to high.
    fn interrupt_requested(&self);
}

/// The lowest set bit (the highest priority) of `bits`.
fn highest_priority(bits: u8) -> Option<u8> {
    (bits != 0).then(|| bits.trailing_zeros() as u8)
}

/// One 8259A.
#[derive(Debug)]
struct Chip {
    s: PicChipState,
    /// ELCR bits a guest may set on this chip.
    elcr_writable: u8,
}

impl Chip {
    fn new(state: &PicChipState, elcr_writable: u8) -> Self {
        let mut chip = Chip {
            s: state.clone(),
            elcr_writable,
        };
        chip.s.elcr &= elcr_writable;
        chip.s.vector_base &= ICW2_VECTOR_MASK;
        // A level-triggered input's request is its line.
        chip.s.irr = (chip.s.irr & !chip.s.elcr) | (chip.s.lines & chip.s.elcr);
        chip
    }

    /// The input this chip would interrupt the CPU for, if any.
    fn pending(&self) -> Option<u8> {
        if !self.s.initialized || self.s.init_step != PicInitStep::Ready {
            return None;
        }
        let request = highest_priority(self.s.irr & !self.s.imr)?;
        match highest_priority(self.s.isr) {
            // Something of equal or higher priority is in service.
            Some(in_service) if in_service <= request => None,
            _ => Some(request),
        }
    }

    fn set_line(&mut self, input: u8, level: bool) {
        let bit = 1u8 << input;
        let was = self.s.lines & bit != 0;
        if level {
            self.s.lines |= bit;
        } else {
            self.s.lines &= !bit;
        }
        if self.s.elcr & bit != 0 {
            if level {
                self.s.irr |= bit;
            } else {
                self.s.irr &= !bit;
            }
        } else if level && !was {
            self.s.irr |= bit;
        }
    }

    /// The INTA cycle for `input`: an edge request is consumed, and the input goes in service unless in auto-EOI
    /// mode.
    fn acknowledge(&mut self, input: u8) {
        let bit = 1u8 << input;
        if self.s.elcr & bit == 0 {
            self.s.irr &= !bit;
        }
        if !self.s.auto_eoi {
            self.s.isr |= bit;
        }
    }

    fn vector(&self, input: u8) -> u8 {
        self.s.vector_base | input
    }

    /// The poll command's answer, acknowledging the interrupt it reports.
    fn poll(&mut self) -> u8 {
        match self.pending() {
            Some(input) => {
                self.acknowledge(input);
                POLL_INTERRUPT | input
            }
            None => 0,
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & ICW1 != 0 {
            self.start_init(value);
        } else if value & OCW3 != 0 {
            if value & OCW3_POLL != 0 {
                self.s.poll = true;
            }
            if value & OCW3_READ_REGISTER != 0 {
                self.s.read_isr = value & OCW3_READ_ISR != 0;
            }
            if value & OCW3_SET_SPECIAL_MASK != 0 {
                self.s.special_mask = value & OCW3_SPECIAL_MASK != 0;
            }
        } else {
            let level = value & OCW2_LEVEL_MASK;
            match value >> OCW2_COMMAND_SHIFT {
                OCW2_NON_SPECIFIC_EOI | OCW2_ROTATE_NON_SPECIFIC_EOI => {
                    if let Some(input) = highest_priority(self.s.isr) {
                        self.s.isr &= !(1 << input);
                    }
                }
                OCW2_SPECIFIC_EOI | OCW2_ROTATE_SPECIFIC_EOI => self.s.isr &= !(1 << level),
                // Rotation in auto-EOI mode, set priority, no operation.
                command => tracing::trace!("8259: ignoring OCW2 command {command:#05b}"),
            }
        }
    }

    /// ICW1: resets the chip and starts the initialisation sequence.
    fn start_init(&mut self, icw1: u8) {
        let s = &mut self.s;
        s.init_step = PicInitStep::Icw2;
        s.initialized = false;
        s.icw4_needed = icw1 & ICW1_NEED_ICW4 != 0;
        s.single = icw1 & ICW1_SINGLE != 0;
        s.imr = 0;
        s.isr = 0;
        // Edge inputs need a new rising edge; level inputs keep requesting while their line is high.
        s.irr = s.lines & s.elcr;
        s.read_isr = false;
        s.poll = false;
        s.special_mask = false;
        // Without an ICW4 its functions are all off.
        s.auto_eoi = false;
        s.special_fully_nested = false;
    }

    fn write_data(&mut self, value: u8) {
        let s = &mut self.s;
        s.init_step = match s.init_step {
            PicInitStep::Ready => {
                s.imr = value;
                PicInitStep::Ready
            }
            PicInitStep::Icw2 => {
                s.vector_base = value & ICW2_VECTOR_MASK;
                if !s.single {
                    PicInitStep::Icw3
                } else if s.icw4_needed {
                    PicInitStep::Icw4
                } else {
                    PicInitStep::Ready
                }
            }
            PicInitStep::Icw3 => {
                if s.icw4_needed {
                    PicInitStep::Icw4
                } else {
                    PicInitStep::Ready
                }
            }
            PicInitStep::Icw4 => {
                s.auto_eoi = value & ICW4_AUTO_EOI != 0;
                s.special_fully_nested = value & ICW4_SPECIAL_FULLY_NESTED != 0;
                PicInitStep::Ready
            }
        };
        if s.init_step == PicInitStep::Ready {
            s.initialized = true;
        }
    }

    fn read_command(&mut self) -> u8 {
        if self.s.poll {
            self.s.poll = false;
            self.poll()
        } else if self.s.read_isr {
            self.s.isr
        } else {
            self.s.irr
        }
    }

    fn set_elcr(&mut self, value: u8) {
        self.s.elcr = value & self.elcr_writable;
        // Inputs now level-triggered request while their line is high.
        self.s.irr = (self.s.irr & !self.s.elcr) | (self.s.lines & self.s.elcr);
    }
}

/// Both chips, without the lock.
#[derive(Debug)]
struct Chips {
    master: Chip,
    slave: Chip,
    /// The output level last reported (to find rising edges).
    output: bool,
}

impl Chips {
    fn new(state: &PicState) -> Self {
        let mut chips = Chips {
            master: Chip::new(&state.master, MASTER_ELCR_WRITABLE),
            slave: Chip::new(&state.slave, SLAVE_ELCR_WRITABLE),
            output: false,
        };
        chips.update();
        chips
    }

    fn state(&self) -> PicState {
        PicState {
            master: self.master.s.clone(),
            slave: self.slave.s.clone(),
        }
    }

    /// Feeds the slave's output to the master's IRQ2 and returns whether the master's output just rose.
    fn update(&mut self) -> bool {
        // The cascade input is level-sensitive whatever the ELCR says: its request is the slave's output.
        let bit = 1 << CASCADE_IRQ;
        if self.slave.pending().is_some() {
            self.master.s.lines |= bit;
            self.master.s.irr |= bit;
        } else {
            self.master.s.lines &= !bit;
            self.master.s.irr &= !bit;
        }
        let output = self.master.pending().is_some();
        let rose = output && !self.output;
        self.output = output;
        rose
    }

    fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            CASCADE_IRQ => {
                tracing::debug!("8259: IRQ2 is the cascade input; ignoring a device driving it")
            }
            0..=7 => self.master.set_line(irq, level),
            8..=15 => self.slave.set_line(irq - 8, level),
            _ => tracing::warn!("8259: ignoring IRQ {irq}; the PICs have IRQs 0..16"),
        }
    }

    fn acknowledge(&mut self) -> Option<u8> {
        if !self.master.s.initialized {
            return None;
        }
        let Some(irq) = self.master.pending() else {
            return Some(self.master.vector(SPURIOUS_IRQ));
        };
        self.master.acknowledge(irq);
        if irq != CASCADE_IRQ {
            return Some(self.master.vector(irq));
        }
        // The slave answers the second INTA cycle.
        Some(match self.slave.pending() {
            Some(input) => {
                self.slave.acknowledge(input);
                self.slave.vector(input)
            }
            None => self.slave.vector(SPURIOUS_IRQ),
        })
    }

    fn chip(&mut self, slave: bool) -> &mut Chip {
        if slave {
            &mut self.slave
        } else {
            &mut self.master
        }
    }
}

/// The two cascaded 8259As and the ELCR. Its methods lock it internally, so it is shared as an `Arc<Pic>`.
pub struct Pic {
    chips: Mutex<Chips>,
    output: Arc<dyn PicOutput>,
}

impl Pic {
    /// Creates both chips in their power-on state (uninitialised, everything masked, all inputs edge-triggered).
    pub fn new(output: Arc<dyn PicOutput>) -> Arc<Pic> {
        Self::from_state(&PicState::default(), output)
    }

    /// Rebuilds the PIC from saved state, dropping ELCR bits the chipset does not have and recomputing the
    /// requests of level-triggered inputs and of the cascade.
    pub fn from_state(state: &PicState, output: Arc<dyn PicOutput>) -> Arc<Pic> {
        Arc::new(Pic {
            chips: Mutex::new(Chips::new(state)),
            output,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Chips> {
        // The registers stay consistent even if a holder panicked.
        self.chips.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the chips, then (after releasing the lock) tells the output if it rose.
    fn with_chips<R>(&self, f: impl FnOnce(&mut Chips) -> R) -> R {
        let (result, rose) = {
            let mut chips = self.lock();
            let result = f(&mut chips);
            (result, chips.update())
        };
        if rose {
            self.output.interrupt_requested();
        }
        result
    }

    /// The current state.
    pub fn state(&self) -> PicState {
        self.lock().state()
    }

    /// Replaces the state (as [`Pic::from_state`] does); tells the output if that raises it.
    pub fn set_state(&self, state: &PicState) {
        self.with_chips(|chips| {
            let output = chips.output;
            *chips = Chips::new(state);
            // Report a rise relative to what the output was before.
            chips.output = output;
        });
    }

    /// Sets the level of ISA IRQ `irq` (0..16). IRQ2 is the cascade and cannot be driven; other out-of-range IRQs
    /// are ignored (logged).
    pub fn set_irq(&self, irq: u8, level: bool) {
        self.with_chips(|chips| chips.set_irq(irq, level));
    }

    /// Whether the PIC's interrupt output (INT of the master) is high.
    pub fn has_interrupt(&self) -> bool {
        self.lock().master.pending().is_some()
    }

    /// The interrupt acknowledge cycle: the vector to inject, with the IRR and ISR updated. When nothing is pending
    /// the vector is the spurious one (IRQ7's, or IRQ15's if the slave had nothing). `None` while the master has
    /// not been initialised.
    pub fn acknowledge(&self) -> Option<u8> {
        self.with_chips(Chips::acknowledge)
    }

    fn read_chip(&self, slave: bool, offset: u64) -> u8 {
        self.with_chips(|chips| {
            let chip = chips.chip(slave);
            match offset {
                COMMAND_OFFSET => chip.read_command(),
                DATA_OFFSET => chip.s.imr,
                _ => 0,
            }
        })
    }

    fn write_chip(&self, slave: bool, offset: u64, value: u8) {
        self.with_chips(|chips| {
            let chip = chips.chip(slave);
            match offset {
                COMMAND_OFFSET => chip.write_command(value),
                DATA_OFFSET => chip.write_data(value),
                _ => {}
            }
        });
    }

    fn read_elcr(&self, offset: u64) -> u8 {
        let chips = self.lock();
        match offset {
            0 => chips.master.s.elcr,
            1 => chips.slave.s.elcr,
            _ => 0,
        }
    }

    fn write_elcr(&self, offset: u64, value: u8) {
        self.with_chips(|chips| match offset {
            0 => chips.master.set_elcr(value),
            1 => chips.slave.set_elcr(value),
            _ => {}
        });
    }
}

impl std::fmt::Debug for Pic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pic")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// Which register block a [`PicPorts`] device serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortBlock {
    Master,
    Slave,
    Elcr,
}

/// The bus devices of the PIC's three port ranges, made by [`pic_bus_devices`]. The bus only holds weak
/// references: keep these alive as long as the ports should answer.
pub struct PicBusDevices {
    /// The master's command and data ports: insert at 0x20 with [`PIC_RANGE_LEN`].
    pub master: Arc<Mutex<dyn BusDevice>>,
    /// The slave's command and data ports: insert at 0xa0 with [`PIC_RANGE_LEN`].
    pub slave: Arc<Mutex<dyn BusDevice>>,
    /// The ELCR: insert at 0x4d0 with [`ELCR_RANGE_LEN`].
    pub elcr: Arc<Mutex<dyn BusDevice>>,
}

/// The bus devices for the master's ports, the slave's ports and the ELCR of `pic`.
pub fn pic_bus_devices(pic: &Arc<Pic>) -> PicBusDevices {
    let ports = |block| -> Arc<Mutex<dyn BusDevice>> {
        Arc::new(Mutex::new(PicPorts {
            pic: pic.clone(),
            block,
        }))
    };
    PicBusDevices {
        master: ports(PortBlock::Master),
        slave: ports(PortBlock::Slave),
        elcr: ports(PortBlock::Elcr),
    }
}

/// One of the PIC's port ranges on a bus.
struct PicPorts {
    pic: Arc<Pic>,
    block: PortBlock,
}

impl BusDevice for PicPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (self.block, data) {
            // The ELCR may be read as one 16-bit register.
            (PortBlock::Elcr, data) => {
                for (i, byte) in data.iter_mut().enumerate() {
                    *byte = offset
                        .checked_add(i as u64)
                        .map_or(0, |at| self.pic.read_elcr(at));
                }
            }
            (block, [byte]) => *byte = self.pic.read_chip(block == PortBlock::Slave, offset),
            // The chips' registers are single bytes: a wider access reads as zero and has no side effects.
            (_, data) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (self.block, data) {
            (PortBlock::Elcr, data) => {
                for (i, &value) in data.iter().enumerate() {
                    if let Some(at) = offset.checked_add(i as u64) {
                        self.pic.write_elcr(at, value);
                    }
                }
            }
            (block, [value]) => self
                .pic
                .write_chip(block == PortBlock::Slave, offset, *value),
            (_, data) => tracing::debug!(
                "8259: ignoring a {}-byte write at offset {offset}",
                data.len()
            ),
        }
    }
}

/// An [`InterruptLine`] for ISA IRQ `irq` of `pic`: `trigger` pulses the input (high, then low), `set_level` holds
/// it. A line for an IRQ the PIC cannot take (2, or 16 and above) returns an error on every use.
pub fn pic_irq_line(pic: &Arc<Pic>, irq: u8) -> Arc<dyn InterruptLine> {
    if irq >= PIC_NUM_IRQS || irq == CASCADE_IRQ {
        tracing::warn!(
            "8259: IRQ {irq} cannot be driven (IRQs 0..16 but 2); its interrupts will fail"
        );
    }
    Arc::new(PicIrqLine {
        pic: pic.clone(),
        irq,
    })
}

/// One PIC input as an [`InterruptLine`].
struct PicIrqLine {
    pic: Arc<Pic>,
    irq: u8,
}

impl PicIrqLine {
    fn check(&self) -> std::io::Result<()> {
        if self.irq >= PIC_NUM_IRQS || self.irq == CASCADE_IRQ {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "8259 IRQ {} cannot be driven; use an ISA IRQ in 0..16 other than the cascade (2)",
                    self.irq
                ),
            ));
        }
        Ok(())
    }
}

impl InterruptLine for PicIrqLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.check()?;
        self.pic.with_chips(|chips| {
            // An edge-triggered input latches the rising edge; a level-triggered one forgets the pulse.
            chips.set_irq(self.irq, true);
            chips.set_irq(self.irq, false);
        });
        Ok(())
    }

    fn set_level(&self, asserted: bool) -> std::io::Result<()> {
        self.check()?;
        self.pic.set_irq(self.irq, asserted);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Kicks(AtomicUsize);

    impl PicOutput for Kicks {
        fn interrupt_requested(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Kicks {
        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// A PIC with its bus devices, as the guest sees it.
    struct Rig {
        pic: Arc<Pic>,
        kicks: Arc<Kicks>,
        ports: PicBusDevices,
    }

    impl Rig {
        fn new() -> Self {
            let kicks = Arc::new(Kicks::default());
            let pic = Pic::new(kicks.clone());
            let ports = pic_bus_devices(&pic);
            Rig { pic, kicks, ports }
        }

        /// `outb` to a PC port number.
        fn outb(&self, port: u16, value: u8) {
            let (dev, offset) = self.port(port);
            dev.lock().unwrap().write(offset, &[value]);
        }

        fn inb(&self, port: u16) -> u8 {
            let (dev, offset) = self.port(port);
            let mut b = [0xa5u8];
            dev.lock().unwrap().read(offset, &mut b);
            b[0]
        }

        fn port(&self, port: u16) -> (&Arc<Mutex<dyn BusDevice>>, u64) {
            match port {
                0x20 | 0x21 => (&self.ports.master, u64::from(port - 0x20)),
                0xa0 | 0xa1 => (&self.ports.slave, u64::from(port - 0xa0)),
                0x4d0 | 0x4d1 => (&self.ports.elcr, u64::from(port - 0x4d0)),
                _ => panic!("not a PIC port: {port:#x}"),
            }
        }

        /// The initialisation SeaBIOS and Linux write: edge, cascade, ICW4; master base 0x08, slave base 0x70,
        /// slave on IRQ2, 8086 mode; then everything masked but the cascade.
        fn init_pc(&self) {
            self.outb(0x20, 0x11);
            self.outb(0x21, 0x08);
            self.outb(0x21, 0x04);
            self.outb(0x21, 0x01);
            self.outb(0xa0, 0x11);
            self.outb(0xa1, 0x70);
            self.outb(0xa1, 0x02);
            self.outb(0xa1, 0x01);
            self.outb(0x21, 0xfb);
            self.outb(0xa1, 0xff);
        }

        /// Unmasks `irq` (and nothing else changes).
        fn unmask(&self, irq: u8) {
            let port = if irq < 8 { 0x21 } else { 0xa1 };
            let imr = self.inb(port);
            self.outb(port, imr & !(1 << (irq % 8)));
        }

        fn pulse(&self, irq: u8) {
            pic_irq_line(&self.pic, irq).trigger().unwrap();
        }
    }

    #[test]
    fn init_sequence_and_timer_interrupt() {
        let rig = Rig::new();
        // Nothing comes out of an uninitialised PIC.
        rig.pic.set_irq(0, true);
        rig.pic.set_irq(0, false);
        assert!(!rig.pic.has_interrupt());
        assert_eq!(rig.pic.acknowledge(), None);

        rig.init_pc();
        let state = rig.pic.state();
        assert_eq!(state.master.vector_base, 0x08);
        assert_eq!(state.slave.vector_base, 0x70);
        assert!(state.master.initialized && state.slave.initialized);
        assert_eq!(rig.inb(0x21), 0xfb);
        assert_eq!(rig.inb(0xa1), 0xff);

        rig.unmask(0);
        assert_eq!(rig.inb(0x21), 0xfa);
        rig.pulse(0);
        assert!(rig.pic.has_interrupt());
        assert_eq!(rig.kicks.count(), 1);
        assert_eq!(rig.pic.acknowledge(), Some(0x08));
        assert!(!rig.pic.has_interrupt());
        // In service until the EOI.
        rig.outb(0x20, 0x0b);
        assert_eq!(rig.inb(0x20), 0x01);
        rig.outb(0x20, 0x20);
        assert_eq!(rig.inb(0x20), 0x00);
    }

    #[test]
    fn icw1_resets_the_chip() {
        let rig = Rig::new();
        rig.init_pc();
        rig.unmask(0);
        rig.pulse(0);
        assert_eq!(rig.pic.acknowledge(), Some(0x08));
        rig.outb(0x20, 0x11);
        let state = rig.pic.state();
        assert_eq!((state.master.isr, state.master.imr), (0, 0));
        assert_eq!(state.master.init_step, PicInitStep::Icw2);
        assert!(!rig.pic.has_interrupt());
        // Single mode without ICW4: ICW2 finishes the sequence.
        rig.outb(0x20, 0x12);
        rig.outb(0x21, 0x20);
        let state = rig.pic.state();
        assert_eq!(state.master.init_step, PicInitStep::Ready);
        assert_eq!(state.master.vector_base, 0x20);
        rig.outb(0x21, 0xfe);
        assert_eq!(rig.inb(0x21), 0xfe);
    }

    #[test]
    fn masked_irq_is_held_until_unmasked() {
        let rig = Rig::new();
        rig.init_pc();
        rig.pulse(1);
        assert!(!rig.pic.has_interrupt());
        assert_eq!(rig.kicks.count(), 0);
        assert_eq!(rig.inb(0x20), 0x02, "IRR holds the masked request");
        rig.unmask(1);
        assert!(rig.pic.has_interrupt());
        assert_eq!(rig.kicks.count(), 1);
        assert_eq!(rig.pic.acknowledge(), Some(0x09));
    }

    #[test]
    fn lower_irq_number_wins_and_eoi_lets_the_next_through() {
        let rig = Rig::new();
        rig.init_pc();
        rig.outb(0x21, 0x00);
        rig.pulse(5);
        rig.pulse(3);
        rig.pulse(4);
        assert_eq!(rig.pic.acknowledge(), Some(0x0b));
        // IRQs 4 and 5 have lower priority than 3, which is in service.
        assert!(!rig.pic.has_interrupt());
        assert_eq!(rig.pic.acknowledge(), Some(0x0f), "spurious while blocked");
        // A higher-priority IRQ interrupts the one in service.
        rig.pulse(1);
        assert!(rig.pic.has_interrupt());
        assert_eq!(rig.pic.acknowledge(), Some(0x09));
        rig.outb(0x20, 0x20); // ends IRQ1
        assert!(!rig.pic.has_interrupt());
        rig.outb(0x20, 0x20); // ends IRQ3
        assert_eq!(rig.pic.acknowledge(), Some(0x0c));
        rig.outb(0x20, 0x64); // specific EOI for IRQ4
        assert_eq!(rig.pic.acknowledge(), Some(0x0d));
        rig.outb(0x20, 0x0b);
        assert_eq!(rig.inb(0x20), 0x20);
        rig.outb(0x20, 0xe5); // rotate on specific EOI acts as a specific EOI
        assert_eq!(rig.inb(0x20), 0x00);
        assert!(!rig.pic.has_interrupt());
    }

    #[test]
    fn slave_irq_arrives_through_irq2() {
        let rig = Rig::new();
        rig.init_pc();
        rig.unmask(8);
        rig.pulse(8);
        assert!(rig.pic.has_interrupt());
        assert_eq!(rig.kicks.count(), 1);
        assert_eq!(rig.inb(0x20), 0x04, "the cascade input requests");
        assert_eq!(rig.pic.acknowledge(), Some(0x70));
        rig.outb(0x20, 0x0b);
        rig.outb(0xa0, 0x0b);
        assert_eq!((rig.inb(0x20), rig.inb(0xa0)), (0x04, 0x01));
        // Linux's order: slave EOI, then master EOI.
        rig.outb(0xa0, 0x20);
        rig.outb(0x20, 0x20);
        assert_eq!((rig.inb(0x20), rig.inb(0xa0)), (0, 0));

        // A masked slave IRQ does not reach the master.
        rig.pulse(12);
        assert!(!rig.pic.has_interrupt());
        rig.unmask(12);
        assert_eq!(rig.pic.acknowledge(), Some(0x74));
        // While the cascade is in service, another slave IRQ waits for both EOIs.
        rig.unmask(9);
        rig.pulse(9);
        assert!(!rig.pic.has_interrupt());
        rig.outb(0xa0, 0x20);
        assert!(!rig.pic.has_interrupt());
        rig.outb(0x20, 0x20);
        assert_eq!(rig.pic.acknowledge(), Some(0x71));
    }

    #[test]
    fn spurious_vectors() {
        let rig = Rig::new();
        rig.init_pc();
        assert_eq!(rig.pic.acknowledge(), Some(0x0f));
        // The slave's request went away between INT and INTA: the slave answers IRQ15's vector.
        rig.outb(0x4d1, 0x02); // IRQ9 level-triggered
        rig.unmask(9);
        rig.pic.set_irq(9, true);
        assert!(rig.pic.has_interrupt());
        let mut chips = rig.pic.lock();
        chips.slave.s.irr = 0;
        drop(chips);
        assert_eq!(rig.pic.acknowledge(), Some(0x77));
        // A spurious acknowledge leaves the in-service registers alone.
        assert_eq!(rig.pic.state().slave.isr, 0);
    }

    #[test]
    fn level_input_requests_again_after_eoi_while_high() {
        let rig = Rig::new();
        rig.init_pc();
        rig.outb(0x4d1, 0x08); // IRQ11 level-triggered
        assert_eq!(rig.inb(0x4d1), 0x08);
        rig.unmask(11);
        rig.pic.set_irq(11, true);
        assert_eq!(rig.kicks.count(), 1);
        assert_eq!(rig.pic.acknowledge(), Some(0x73));
        assert!(!rig.pic.has_interrupt());
        rig.outb(0xa0, 0x20);
        rig.outb(0x20, 0x20);
        assert!(rig.pic.has_interrupt(), "the line is still high");
        assert_eq!(rig.kicks.count(), 2);
        assert_eq!(rig.pic.acknowledge(), Some(0x73));
        // The device lowers the line before the EOI: nothing more.
        rig.pic.set_irq(11, false);
        rig.outb(0xa0, 0x20);
        rig.outb(0x20, 0x20);
        assert!(!rig.pic.has_interrupt());
        // A level request that goes away before the acknowledge is withdrawn.
        rig.pic.set_irq(11, true);
        assert!(rig.pic.has_interrupt());
        rig.pic.set_irq(11, false);
        assert!(!rig.pic.has_interrupt());
    }

    #[test]
    fn edge_input_needs_a_new_edge() {
        let rig = Rig::new();
        rig.init_pc();
        rig.unmask(4);
        rig.pic.set_irq(4, true);
        assert_eq!(rig.pic.acknowledge(), Some(0x0c));
        rig.outb(0x20, 0x20);
        // Still high, but no new edge.
        assert!(!rig.pic.has_interrupt());
        rig.pic.set_irq(4, true);
        assert!(!rig.pic.has_interrupt());
        rig.pic.set_irq(4, false);
        assert!(!rig.pic.has_interrupt());
        rig.pic.set_irq(4, true);
        assert!(rig.pic.has_interrupt());
        // An edge request stays latched when the line drops before the acknowledge.
        rig.pic.set_irq(4, false);
        assert_eq!(rig.pic.acknowledge(), Some(0x0c));
    }

    #[test]
    fn elcr_read_only_bits() {
        let rig = Rig::new();
        rig.outb(0x4d0, 0xff);
        rig.outb(0x4d1, 0xff);
        assert_eq!(rig.inb(0x4d0), 0xf8);
        assert_eq!(rig.inb(0x4d1), 0xde);
        // A 16-bit access covers both registers.
        let mut w = [0u8; 2];
        rig.ports.elcr.lock().unwrap().write(0, &[0x20, 0x0c]);
        rig.ports.elcr.lock().unwrap().read(0, &mut w);
        assert_eq!(w, [0x20, 0x0c]);
    }

    #[test]
    fn ocw3_selects_irr_or_isr() {
        let rig = Rig::new();
        rig.init_pc();
        rig.outb(0x21, 0x00);
        rig.pulse(3);
        rig.pulse(6);
        assert_eq!(rig.inb(0x20), 0x48, "IRR after reset");
        assert_eq!(rig.pic.acknowledge(), Some(0x0b));
        assert_eq!(rig.inb(0x20), 0x40);
        rig.outb(0x20, 0x0b);
        assert_eq!(rig.inb(0x20), 0x08);
        assert_eq!(rig.inb(0x20), 0x08, "the selection sticks");
        // OCW3 without RR leaves the selection alone.
        rig.outb(0x20, 0x08);
        assert_eq!(rig.inb(0x20), 0x08);
        rig.outb(0x20, 0x0a);
        assert_eq!(rig.inb(0x20), 0x40);
        // Special mask mode is recorded.
        rig.outb(0x20, 0x68);
        assert!(rig.pic.state().master.special_mask);
    }

    #[test]
    fn poll_command_acknowledges() {
        let rig = Rig::new();
        rig.init_pc();
        rig.outb(0x21, 0x00);
        rig.outb(0x20, 0x0c);
        assert_eq!(rig.inb(0x20), 0x00, "nothing pending");
        rig.pulse(5);
        rig.outb(0x20, 0x0c);
        assert_eq!(rig.inb(0x20), 0x85);
        assert_eq!(rig.pic.state().master.isr, 0x20);
        assert_eq!(rig.pic.state().master.irr, 0x00);
        // Only one read polls.
        assert_eq!(rig.inb(0x20), 0x00);
        rig.outb(0x20, 0x20);
        // Polling the cascade: the master answers 2, then the slave its own level.
        rig.outb(0xa1, 0x00);
        rig.pulse(10);
        rig.outb(0x20, 0x0c);
        assert_eq!(rig.inb(0x20), 0x82);
        rig.outb(0xa0, 0x0c);
        assert_eq!(rig.inb(0xa0), 0x82);
        assert_eq!(rig.pic.state().slave.isr, 0x04);
    }

    #[test]
    fn auto_eoi_leaves_nothing_in_service() {
        let rig = Rig::new();
        rig.outb(0x20, 0x11);
        rig.outb(0x21, 0x20);
        rig.outb(0x21, 0x04);
        rig.outb(0x21, 0x03); // 8086 mode, auto-EOI
        rig.outb(0x21, 0x00);
        assert!(rig.pic.state().master.auto_eoi);
        rig.pulse(0);
        rig.pulse(1);
        assert_eq!(rig.pic.acknowledge(), Some(0x20));
        assert_eq!(rig.pic.state().master.isr, 0);
        // No EOI needed before the next one.
        assert_eq!(rig.pic.acknowledge(), Some(0x21));
        assert!(!rig.pic.has_interrupt());
    }

    #[test]
    fn output_is_reported_exactly_on_rising_edges() {
        let rig = Rig::new();
        rig.init_pc();
        rig.outb(0x21, 0x00);
        rig.outb(0xa1, 0x00);
        rig.pulse(3);
        assert_eq!(rig.kicks.count(), 1);
        // Already high: more requests do not kick again.
        rig.pulse(4);
        rig.pulse(9);
        assert_eq!(rig.kicks.count(), 1);
        assert_eq!(
            rig.pic.acknowledge(),
            Some(0x71),
            "the cascade outranks IRQ3"
        );
        assert!(!rig.pic.has_interrupt());
        // The slave's EOI alone does not let anything through; the master's does (IRQ3).
        rig.outb(0xa0, 0x20);
        assert_eq!(rig.kicks.count(), 1);
        rig.outb(0x20, 0x20);
        assert_eq!(rig.kicks.count(), 2);
        // Masking and unmasking a pending IRQ is a new rising edge.
        rig.outb(0x21, 0xff);
        assert!(!rig.pic.has_interrupt());
        rig.outb(0x21, 0x00);
        assert_eq!(rig.kicks.count(), 3);
        // Acknowledging never kicks.
        assert_eq!(rig.pic.acknowledge(), Some(0x0b));
        assert_eq!(rig.kicks.count(), 3);
        // Nothing for a masked IRQ or an ignored one.
        rig.outb(0x21, 0xff);
        rig.pulse(5);
        rig.pic.set_irq(2, true);
        rig.pic.set_irq(16, true);
        assert_eq!(rig.kicks.count(), 3);
    }

    #[test]
    fn output_callback_runs_without_the_lock() {
        /// Checks the PIC from inside the callback, which would deadlock if the lock were held.
        struct Reentrant(Mutex<Option<Arc<Pic>>>, AtomicUsize);
        impl PicOutput for Reentrant {
            fn interrupt_requested(&self) {
                if let Some(pic) = self.0.lock().unwrap().as_ref() {
                    assert!(pic.has_interrupt());
                    self.1.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        let out = Arc::new(Reentrant(Mutex::new(None), AtomicUsize::new(0)));
        let pic = Pic::new(out.clone());
        *out.0.lock().unwrap() = Some(pic.clone());
        let ports = pic_bus_devices(&pic);
        for (offset, value) in [(0, 0x11), (1, 0x08), (1, 0x04), (1, 0x01), (1, 0x00)] {
            ports.master.lock().unwrap().write(offset, &[value]);
        }
        pic_irq_line(&pic, 0).trigger().unwrap();
        assert_eq!(out.1.load(Ordering::SeqCst), 1);
        *out.0.lock().unwrap() = None;
    }

    #[test]
    fn irq_lines_reject_impossible_irqs() {
        let rig = Rig::new();
        for irq in [2, 16, 255] {
            let line = pic_irq_line(&rig.pic, irq);
            assert!(line.trigger().is_err());
            assert!(line.set_level(true).is_err());
        }
        let line = pic_irq_line(&rig.pic, 15);
        line.set_level(true).unwrap();
        assert_eq!(rig.pic.state().slave.lines, 0x80);
        line.set_level(false).unwrap();
        assert_eq!(rig.pic.state().slave.lines, 0);
    }

    #[test]
    fn state_round_trip() {
        let rig = Rig::new();
        rig.init_pc();
        rig.outb(0x4d1, 0x02);
        rig.unmask(9);
        rig.unmask(1);
        rig.pulse(1);
        rig.pic.set_irq(9, true);
        assert_eq!(rig.pic.acknowledge(), Some(0x09));
        // IRQ1 in service holds back the cascade; its EOI lets IRQ9 through.
        assert!(!rig.pic.has_interrupt());
        rig.outb(0x20, 0x20);
        assert!(rig.pic.has_interrupt());
        rig.outb(0xa0, 0x0b);
        let state = rig.pic.state();

        let kicks = Arc::new(Kicks::default());
        let restored = Pic::from_state(&state, kicks.clone());
        assert_eq!(restored.state(), state);
        assert!(restored.has_interrupt());
        assert_eq!(restored.acknowledge(), Some(0x71));

        // set_state on a PIC whose output was low reports the rise.
        let other = Rig::new();
        other.pic.set_state(&state);
        assert_eq!(other.pic.state(), state);
        assert_eq!(other.kicks.count(), 1);

        // Impossible values are cleaned up.
        let mut odd = state.clone();
        odd.master.elcr = 0xff;
        odd.master.vector_base = 0x0f;
        odd.slave.lines = 0x02;
        odd.slave.irr = 0x00;
        let cleaned = Pic::from_state(&odd, kicks).state();
        assert_eq!(cleaned.master.elcr, 0xf8);
        assert_eq!(cleaned.master.vector_base, 0x08);
        assert_eq!(cleaned.slave.irr & 0x02, 0x02, "level input requests");
    }

    /// A small xorshift generator, so the garbage test is reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn garbage_never_panics() {
        // Every byte to every command and data port, starting from each initialisation step.
        for step in 0..4 {
            for offset in 0..4u64 {
                for value in 0..=255u8 {
                    let rig = Rig::new();
                    rig.outb(0x20, 0x11);
                    for _ in 0..step {
                        rig.outb(0x21, 0x00);
                    }
                    for dev in [&rig.ports.master, &rig.ports.slave, &rig.ports.elcr] {
                        dev.lock().unwrap().write(offset, &[value]);
                        let mut b = [0u8];
                        dev.lock().unwrap().read(offset, &mut b);
                    }
                    rig.pic.acknowledge();
                }
            }
        }

        // Random sequences of port accesses, IRQs and acknowledges.
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..200 {
            let rig = Rig::new();
            for _ in 0..500 {
                let r = rng.next();
                let value = (r >> 8) as u8;
                let offset = (r >> 16) % 3;
                let dev = match (r >> 24) % 3 {
                    0 => &rig.ports.master,
                    1 => &rig.ports.slave,
                    _ => &rig.ports.elcr,
                };
                match r % 6 {
                    0 | 1 => dev.lock().unwrap().write(offset, &[value]),
                    2 => dev
                        .lock()
                        .unwrap()
                        .read(offset, &mut [0u8; 3][..(r >> 32) as usize % 4]),
                    3 => rig.pic.set_irq(value % 20, r & (1 << 40) != 0),
                    4 => {
                        if let Some(vector) = rig.pic.acknowledge() {
                            let state = rig.pic.state();
                            let master = state.master.vector_base;
                            let slave = state.slave.vector_base;
                            assert!(
                                vector & 0xf8 == master || vector & 0xf8 == slave,
                                "{vector:#x}"
                            );
                        }
                    }
                    _ => dev
                        .lock()
                        .unwrap()
                        .write(offset, &[value, value][..(r >> 32) as usize % 3]),
                }
                // The output tracks the master's state.
                let state = rig.pic.state();
                assert_eq!(state.master.irr & 0x04 != 0, state.master.lines & 0x04 != 0);
            }
        }
    }
}
