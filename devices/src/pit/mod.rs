//! The 8254 programmable interval timer (three channels, ports 0x40..0x43 on a PC) and system control port B
//! (port 0x61), which gates channel 2 and shows its output.
//!
//! Nothing ticks: each channel remembers when it started counting, and its count and output are computed from the
//! host's monotonic clock (at 1.193182 MHz) whenever the guest reads them. Channel 0's output drives ISA IRQ 0 through
//! the [`InterruptLine`] given to [`Pit::new`]: the PIT arms a timerfd for the next rising edge of that output, the
//! VMM polls [`Pit::timer_fd`] and calls [`Pit::handle_timer`] when it is readable, and the PIT pulses the line
//! (once per period in modes 2 and 3, once at terminal count in modes 0 and 4) and re-arms. If the VMM was late
//! and several periods went by, the guest gets one interrupt, not a burst of them (a timer-tick-counting guest loses
//! the missed ticks, as it would with any coalescing timer), and the next one comes at the next period boundary.
//! Periodic interrupts are at least 200 microseconds apart (as with KVM's in-kernel PIT), however small the count.
//!
//! Modelled: modes 0-5 (6 and 7 are 2 and 3), the low-byte, high-byte and low-then-high access modes, the counter
//! latch command and the read-back command (count and status), the null-count flag, and the gate: channels 0 and 1
//! have theirs tied high, channel 2's is bit 0 of port B. Modes 1 and 5 start counting on a rising edge of the gate
//! after the count is written, so on channels 0 and 1 they never start (as on a PC). A new count takes effect at
//! once (the 8254 would wait for the end of the current period in modes 2 and 3). BCD counting is not implemented:
//! the BCD bit is stored and reported in the status byte, but the channel counts in binary.
//!
//! Port B (offset 0 of its own one-port range): bit 0 channel 2's gate and bit 1 the speaker data enable (no sound
//! is made) read back what was written, as do bits 2 and 3 (the parity and I/O channel check enables, no effect);
//! bit 4 is the refresh request toggle, which flips every 18 PIT ticks (about 15 microseconds) for delay loops;
//! bit 5 is channel 2's output; bits 6 and 7 (error flags) read as zero.
//!
//! Lock order: the PIT calls its IRQ 0 line while its own lock is held (the line, e.g. the PIC's, must not call
//! back into the PIT).

mod channel;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;
use channel::Channel;

/// The PIT's input clock in Hz.
pub const PIT_FREQUENCY_HZ: u64 = 1_193_182;
/// Length of the counters' and control word's port range (0x40..0x43 on a PC).
pub const PIT_RANGE_LEN: u64 = 4;
/// Length of port B's range (0x61 on a PC).
pub const PORT_B_RANGE_LEN: u64 = 1;

const NANOS_PER_SECOND: u128 = 1_000_000_000;
/// The shortest time between two periodic channel-0 interrupts: 200 microseconds, in ticks (rounded up).
const MIN_IRQ_INTERVAL_TICKS: u64 = (200_000 * PIT_FREQUENCY_HZ).div_ceil(1_000_000_000);
/// Ticks per flip of port B's refresh request toggle (15.09 us).
const REFRESH_TOGGLE_TICKS: u64 = 18;

/// The control word's offset; offsets 0..=2 are the channels' data ports.
const CONTROL_OFFSET: u64 = 3;
const NUM_CHANNELS: usize = 3;
/// The channel whose gate is port B's bit 0 and whose output is bit 5.
const SPEAKER_CHANNEL: usize = 2;

// Control word fields.
const CONTROL_SELECT_SHIFT: u32 = 6;
const CONTROL_SELECT_READ_BACK: u8 = 3;
const CONTROL_ACCESS_SHIFT: u32 = 4;
const CONTROL_ACCESS_MASK: u8 = 3;
const CONTROL_ACCESS_LATCH: u8 = 0;
const CONTROL_MODE_SHIFT: u32 = 1;
const CONTROL_BCD: u8 = 1;
// Read-back command bits (active low).
const READ_BACK_NO_COUNT: u8 = 0x20;
const READ_BACK_NO_STATUS: u8 = 0x10;
const READ_BACK_CHANNEL_SHIFT: u32 = 1;

// Port B.
const PORT_B_GATE: u8 = 0x01;
/// The bits that read back what was written: gate, speaker, parity and channel check enables.
const PORT_B_WRITABLE: u8 = 0x0f;
const PORT_B_REFRESH: u8 = 0x10;
const PORT_B_OUTPUT: u8 = 0x20;

/// How a channel's data port reads and writes its 16-bit count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum PitAccess {
    /// Only the low byte (the high byte is zero).
    LowByte = 1,
    /// Only the high byte (the low byte is zero).
    HighByte = 2,
    /// The low byte, then the high byte.
    #[default]
    LowHigh = 3,
}

impl PitAccess {
    /// The access mode of a control word's RW field (not 0, which is the latch command).
    fn from_field(field: u8) -> Option<Self> {
        match field {
            1 => Some(PitAccess::LowByte),
            2 => Some(PitAccess::HighByte),
            3 => Some(PitAccess::LowHigh),
            _ => None,
        }
    }
}

/// One channel's registers and progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PitChannelState {
    /// The counting mode, 0..=5.
    pub mode: u8,
    /// The access mode.
    pub access: PitAccess,
    /// The control word's BCD bit (reported, but counting is binary).
    pub bcd: bool,
    /// The count register (0 means 65536).
    pub initial_count: u16,
    /// A complete count has been written since the last control word.
    pub count_written: bool,
    /// Modes 1 and 5: a gate edge has started counting since the count was written.
    pub triggered: bool,
    /// The gate input (always high on channels 0 and 1).
    pub gate: bool,
    /// Input clock ticks counted since counting started.
    pub elapsed: u64,
    /// The status byte's null-count flag: a count was written but not loaded yet.
    pub null_count: bool,
    /// Low-then-high access: the low byte written, waiting for the high byte.
    pub write_low: Option<u8>,
    /// Low-then-high access: the next read returns the high byte.
    pub read_high_next: bool,
    /// A latched count not yet read out.
    pub latched_count: Option<u16>,
    /// A latched status byte not yet read.
    pub latched_status: Option<u8>,
}

/// The PIT's and port B's guest-visible state (the timerfd is a live handle, not state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PitState {
    /// Channels 0, 1 and 2.
    pub channels: [PitChannelState; NUM_CHANNELS],
    /// Port B's writable bits (bit 0: channel 2's gate, bit 1: speaker enable, bits 2-3: check enables).
    pub port_b: u8,
}

impl Default for PitState {
    fn default() -> Self {
        let tied_high = PitChannelState {
            gate: true,
            ..PitChannelState::default()
        };
        PitState {
            channels: [tied_high.clone(), tied_high, PitChannelState::default()],
            port_b: 0,
        }
    }
}

/// Errors creating or arming the PIT's timer.
#[derive(Debug, thiserror::Error)]
pub enum PitError {
    /// `timerfd_create` failed.
    #[error("cannot create the PIT's timerfd: {0}; check the process's open file limit")]
    CreateTimer(#[source] vmm_sys_util::errno::Error),
    /// Making the timerfd non-blocking failed.
    #[error("cannot make the PIT's timerfd non-blocking: {0}")]
    NonBlocking(#[source] std::io::Error),
    /// `timerfd_settime` failed.
    #[error("cannot arm the PIT's timerfd: {0}")]
    ArmTimer(#[source] vmm_sys_util::errno::Error),
}

/// A monotonic time source in nanoseconds from an arbitrary origin (the host clock, or a test's).
trait Clock: Send {
    fn now_nanos(&self) -> u64;
}

/// The host's monotonic clock (the one timerfds use).
struct HostClock(Instant);

impl Clock for HostClock {
    fn now_nanos(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// PIT ticks in `nanos` nanoseconds (rounded down).
fn nanos_to_ticks(nanos: u64) -> u64 {
    let ticks = u128::from(nanos) * u128::from(PIT_FREQUENCY_HZ) / NANOS_PER_SECOND;
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

/// The first nanosecond at or after tick `ticks`.
fn ticks_to_nanos(ticks: u64) -> u64 {
    let nanos = (u128::from(ticks) * NANOS_PER_SECOND).div_ceil(u128::from(PIT_FREQUENCY_HZ));
    u64::try_from(nanos).unwrap_or(u64::MAX)
}

/// The 8254 PIT and port B.
pub struct Pit {
    channels: [Channel; NUM_CHANNELS],
    /// Port B's writable bits.
    port_b: u8,
    irq0: Arc<dyn InterruptLine>,
    timer: TimerFd,
    clock: Box<dyn Clock>,
    /// The tick the timer is armed for: the next rising edge of channel 0's output (or the earliest time a
    /// periodic interrupt may come), `None` when disarmed.
    irq_due: Option<u64>,
    /// How long the timer was last armed for (`None`: disarmed), for tests.
    armed_for: Option<Duration>,
}

impl Pit {
    /// Creates the PIT with nothing programmed (the timer disarmed); channel 0 will pulse `irq0`.
    pub fn new(irq0: Arc<dyn InterruptLine>) -> Result<Pit, PitError> {
        Self::with_clock(irq0, Box::new(HostClock(Instant::now())))
    }

    fn with_clock(irq0: Arc<dyn InterruptLine>, clock: Box<dyn Clock>) -> Result<Pit, PitError> {
        let timer = TimerFd::new().map_err(PitError::CreateTimer)?;
        set_nonblocking(timer.as_raw_fd()).map_err(PitError::NonBlocking)?;
        let now = nanos_to_ticks(clock.now_nanos());
        let state = PitState::default();
        Ok(Pit {
            channels: state
                .channels
                .each_ref()
                .map(|s| Channel::from_state(s, now)),
            port_b: state.port_b,
            irq0,
            timer,
            clock,
            irq_due: None,
            armed_for: None,
        })
    }

    /// The current state; counting progress is captured as of now.
    pub fn state(&self) -> PitState {
        let now = self.now();
        PitState {
            channels: self.channels.each_ref().map(|c| c.state(now)),
            port_b: self.port_b,
        }
    }

    /// Replaces the state: channels carry on counting from where the state says, and the timer is re-armed for
    /// channel 0's next edge. Modes 6 and 7 become 2 and 3; channels 0 and 1 keep their gates high and channel 2's
    /// gate follows port B.
    pub fn set_state(&mut self, state: &PitState) -> Result<(), PitError> {
        let now = self.now();
        self.port_b = state.port_b & PORT_B_WRITABLE;
        self.channels = state
            .channels
            .each_ref()
            .map(|s| Channel::from_state(s, now));
        for (i, channel) in self.channels.iter_mut().enumerate() {
            let gate = i != SPEAKER_CHANNEL || self.port_b & PORT_B_GATE != 0;
            channel.set_gate(gate, now);
        }
        self.arm(self.channels[0].next_rising_edge(now))
    }

    /// The timerfd to poll for readability; call [`Pit::handle_timer`] when it is readable. It stays open as long
    /// as the PIT exists.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Handles the timer: clears the timerfd, pulses IRQ 0 if channel 0's output has had a rising edge since the
    /// last one delivered (once, however many periods went by) and re-arms the timer for the next one. A failure to
    /// raise the interrupt or re-arm is logged.
    pub fn handle_timer(&mut self) {
        // The count of expirations does not matter (and is zero if a guest write re-armed the timer since, which
        // the non-blocking descriptor reports as EAGAIN).
        if let Err(e) = self.timer.wait() {
            if e.errno() != libc::EAGAIN {
                tracing::warn!("PIT: cannot read the timerfd: {e}");
            }
        }

        let now = self.now();
        let Some(due) = self.irq_due else {
            return;
        };
        let next = if now >= due {
            if let Err(e) = self.irq0.trigger() {
                tracing::warn!("PIT: cannot raise IRQ 0: {e}");
            }
            let earliest = now.saturating_add(MIN_IRQ_INTERVAL_TICKS);
            self.channels[0]
                .next_rising_edge(now)
                .map(|edge| edge.max(earliest))
        } else {
            // Woken early (or by a stale expiration): keep waiting for the same edge.
            Some(due)
        };
        if let Err(e) = self.arm(next) {
            tracing::warn!("{e}");
        }
    }

    fn now(&self) -> u64 {
        nanos_to_ticks(self.clock.now_nanos())
    }

    /// Arms the timer for tick `due` (or disarms it).
    fn arm(&mut self, due: Option<u64>) -> Result<(), PitError> {
        self.irq_due = due;
        self.armed_for = match due {
            Some(due) => {
                let wait = ticks_to_nanos(due).saturating_sub(self.clock.now_nanos());
                // A zero duration would disarm the timer: an edge due now fires at once.
                let wait = Duration::from_nanos(wait.max(1));
                self.timer.reset(wait, None).map_err(PitError::ArmTimer)?;
                Some(wait)
            }
            None => {
                self.timer.clear().map_err(PitError::ArmTimer)?;
                None
            }
        };
        Ok(())
    }

    /// Re-arms the timer after channel 0 was reprogrammed.
    fn channel0_changed(&mut self, now: u64) {
        let next = self.channels[0].next_rising_edge(now);
        if next != self.irq_due {
            if let Err(e) = self.arm(next) {
                tracing::warn!("{e}");
            }
        }
    }

    fn write_control(&mut self, value: u8, now: u64) {
        let select = value >> CONTROL_SELECT_SHIFT;
        if select == CONTROL_SELECT_READ_BACK {
            for (i, channel) in self.channels.iter_mut().enumerate() {
                if value & (1 << (i as u32 + READ_BACK_CHANNEL_SHIFT)) == 0 {
                    continue;
                }
                if value & READ_BACK_NO_COUNT == 0 {
                    channel.latch_count(now);
                }
                if value & READ_BACK_NO_STATUS == 0 {
                    channel.latch_status(now);
                }
            }
            return;
        }
        let index = usize::from(select);
        let Some(channel) = self.channels.get_mut(index) else {
            return;
        };
        let field = (value >> CONTROL_ACCESS_SHIFT) & CONTROL_ACCESS_MASK;
        match PitAccess::from_field(field) {
            None => {
                debug_assert_eq!(field, CONTROL_ACCESS_LATCH);
                channel.latch_count(now);
            }
            Some(access) => {
                channel.write_control(
                    access,
                    value >> CONTROL_MODE_SHIFT,
                    value & CONTROL_BCD != 0,
                );
                if index == 0 {
                    self.channel0_changed(now);
                }
            }
        }
    }

    fn read_port_b(&self, now: u64) -> u8 {
        let mut value = self.port_b;
        if (now / REFRESH_TOGGLE_TICKS) % 2 == 1 {
            value |= PORT_B_REFRESH;
        }
        if self.channels[SPEAKER_CHANNEL].output(now) {
            value |= PORT_B_OUTPUT;
        }
        value
    }

    fn write_port_b(&mut self, value: u8, now: u64) {
        self.port_b = value & PORT_B_WRITABLE;
        self.channels[SPEAKER_CHANNEL].set_gate(value & PORT_B_GATE != 0, now);
    }

    /// A one-byte read of the counters' range.
    fn read_counters(&mut self, offset: u64) -> u8 {
        let now = self.now();
        match usize::try_from(offset)
            .ok()
            .and_then(|i| self.channels.get_mut(i))
        {
            Some(channel) => channel.read(now),
            // The control word register cannot be read.
            None => 0,
        }
    }

    /// A one-byte write to the counters' range.
    fn write_counters(&mut self, offset: u64, value: u8) {
        let now = self.now();
        match offset {
            CONTROL_OFFSET => self.write_control(value, now),
            0..CONTROL_OFFSET => {
                // In range: offsets 0..=2 are the channels.
                self.channels[offset as usize].write_count(value, now);
                if offset == 0 {
                    self.channel0_changed(now);
                }
            }
            _ => {}
        }
    }
}

/// Makes `fd` non-blocking, so reading a timer that has not expired returns at once.
fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL only reads the flags of a descriptor the caller owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL only changes the status flags of a descriptor the caller owns.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl std::fmt::Debug for Pit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pit")
            .field("state", &self.state())
            .field("irq_due", &self.irq_due)
            .finish_non_exhaustive()
    }
}

/// The PIT's two port ranges, made by [`pit_bus_devices`]. The bus only holds weak references: keep these alive as
/// long as the ports should answer.
pub struct PitBusDevices {
    /// The counters and control word: insert at 0x40 with [`PIT_RANGE_LEN`].
    pub counters: Arc<Mutex<dyn BusDevice>>,
    /// System control port B: insert at 0x61 with [`PORT_B_RANGE_LEN`].
    pub port_b: Arc<Mutex<dyn BusDevice>>,
}

/// The bus devices for `pit`'s counters and port B.
pub fn pit_bus_devices(pit: &Arc<Mutex<Pit>>) -> PitBusDevices {
    PitBusDevices {
        counters: Arc::new(Mutex::new(PitPorts {
            pit: pit.clone(),
            port_b: false,
        })),
        port_b: Arc::new(Mutex::new(PitPorts {
            pit: pit.clone(),
            port_b: true,
        })),
    }
}

/// One of the PIT's port ranges on a bus.
struct PitPorts {
    pit: Arc<Mutex<Pit>>,
    /// Port B rather than the counters.
    port_b: bool,
}

impl BusDevice for PitPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The registers are single bytes: a wider access reads as zero and has no side effects.
        let [byte] = data else {
            data.fill(0);
            return;
        };
        let mut pit = self.pit.lock().unwrap_or_else(|p| p.into_inner());
        *byte = match (self.port_b, offset) {
            (true, 0) => {
                let now = pit.now();
                pit.read_port_b(now)
            }
            (true, _) => 0,
            (false, offset) => pit.read_counters(offset),
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            tracing::debug!(
                "PIT: ignoring a {}-byte write at offset {offset}",
                data.len()
            );
            return;
        };
        let mut pit = self.pit.lock().unwrap_or_else(|p| p.into_inner());
        match (self.port_b, offset) {
            (true, 0) => {
                let now = pit.now();
                pit.write_port_b(*value, now);
            }
            (true, _) => {}
            (false, offset) => pit.write_counters(offset, *value),
        }
    }
}

#[cfg(test)]
mod tests;
