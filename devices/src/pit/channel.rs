//! One 8254 counter, computed from a tick count instead of being clocked.
//!
//! Every method takes `now`, the current time in PIT input clock ticks (1.193182 MHz) from an arbitrary origin. The
//! counter remembers how many ticks it had counted when it last stopped (`elapsed`) and since when it has been
//! running; the count and the output level follow from that.

use super::{PitAccess, PitChannelState};

/// Modes whose counting is started by a rising edge of the gate (hardware-triggered one-shot and strobe).
fn gate_triggered(mode: u8) -> bool {
    matches!(mode, 1 | 5)
}

/// The status byte's bits.
const STATUS_OUTPUT: u8 = 0x80;
const STATUS_NULL_COUNT: u8 = 0x40;
const STATUS_ACCESS_SHIFT: u32 = 4;
const STATUS_MODE_SHIFT: u32 = 1;

/// The mode a 3-bit mode field selects (6 and 7 are aliases of 2 and 3).
pub(super) fn normalize_mode(mode: u8) -> u8 {
    match mode & 7 {
        6 => 2,
        7 => 3,
        m => m,
    }
}

/// One counter.
#[derive(Clone, Debug)]
pub(super) struct Channel {
    /// Registers and flags; `s.elapsed` holds the ticks counted up to `running_since`.
    pub(super) s: PitChannelState,
    /// The tick since which the counter has been counting, or `None` while it is stopped.
    running_since: Option<u64>,
}

impl Channel {
    /// A channel from saved state, counting from `now` if the state says it counts.
    pub(super) fn from_state(state: &PitChannelState, now: u64) -> Self {
        let mut s = state.clone();
        s.mode = normalize_mode(s.mode);
        let mut channel = Channel {
            s,
            running_since: None,
        };
        channel.sync_running(now);
        channel
    }

    /// The state, with the ticks counted up to `now`.
    pub(super) fn state(&self, now: u64) -> PitChannelState {
        PitChannelState {
            elapsed: self.elapsed(now),
            ..self.s.clone()
        }
    }

    /// The initial count as a number of ticks (a count of 0 means 65536).
    fn period(&self) -> u64 {
        match self.s.initial_count {
            0 => 0x1_0000,
            n => u64::from(n),
        }
    }

    /// A count has been loaded and (in the gate-triggered modes) the gate has fired since.
    fn started(&self) -> bool {
        self.s.count_written && (!gate_triggered(self.s.mode) || self.s.triggered)
    }

    /// The counter is counting: started, and its gate lets it (the gate-triggered modes ignore a low gate).
    fn counting(&self) -> bool {
        self.started() && (self.s.gate || gate_triggered(self.s.mode))
    }

    /// Ticks counted since counting started.
    fn elapsed(&self, now: u64) -> u64 {
        let running = self
            .running_since
            .map_or(0, |since| now.saturating_sub(since));
        self.s.elapsed.saturating_add(running)
    }

    /// Starts or stops the running clock to match [`Channel::counting`].
    fn sync_running(&mut self, now: u64) {
        match (self.counting(), self.running_since) {
            (true, None) => self.running_since = Some(now),
            (false, Some(_)) => {
                self.s.elapsed = self.elapsed(now);
                self.running_since = None;
            }
            _ => {}
        }
    }

    /// Loads the initial count into the counter: counting starts over.
    fn restart(&mut self, now: u64) {
        self.s.elapsed = 0;
        self.running_since = None;
        self.sync_running(now);
    }

    /// The output level.
    pub(super) fn output(&self, now: u64) -> bool {
        if !self.started() {
            // After a control word the output is low in mode 0 and high in the others.
            return self.s.mode != 0;
        }
        let (n, e) = (self.period(), self.elapsed(now));
        match self.s.mode {
            0 | 1 => e >= n,
            // One tick low at the end of each period; a low gate holds the output high.
            2 => !self.s.gate || n == 1 || e % n != n - 1,
            // High for the first (larger) half of each period.
            3 => !self.s.gate || e % n < n.div_ceil(2),
            // One tick low when the count reaches zero.
            _ => e != n,
        }
    }

    /// The counting element's value.
    pub(super) fn count(&self, now: u64) -> u16 {
        if !self.started() {
            return self.s.initial_count;
        }
        let (n, e) = (self.period(), self.elapsed(now));
        let value = match self.s.mode {
            2 => n - e % n,
            3 => {
                // Counts down by two, once per half period.
                let phase = e % n;
                let half = n.div_ceil(2);
                let into_half = if phase < half { phase } else { phase - half };
                (n.saturating_sub(2 * into_half) & !1).max(2)
            }
            // The one-shot modes keep counting down past zero, wrapping.
            _ => n.wrapping_sub(e),
        };
        // Truncation is the point: 65536 reads as 0, and the one-shot modes wrap.
        value as u16
    }

    /// The read-back status byte.
    fn status(&self, now: u64) -> u8 {
        let mut status = (self.s.access as u8) << STATUS_ACCESS_SHIFT
            | self.s.mode << STATUS_MODE_SHIFT
            | u8::from(self.s.bcd);
        if self.output(now) {
            status |= STATUS_OUTPUT;
        }
        if self.s.null_count {
            status |= STATUS_NULL_COUNT;
        }
        status
    }

    /// The tick, after `now`, of the output's next rising edge, if the counter will make one without being
    /// reprogrammed (periodic modes: every period; one-shot modes: once).
    pub(super) fn next_rising_edge(&self, now: u64) -> Option<u64> {
        if !self.counting() {
            return None;
        }
        let (n, e) = (self.period(), self.elapsed(now));
        let at = match self.s.mode {
            0 | 1 => n,
            2 | 3 => (e / n).checked_add(1)?.checked_mul(n)?,
            // Modes 4 and 5: the output comes back up one tick after its strobe.
            _ => n + 1,
        };
        if at <= e {
            return None;
        }
        now.checked_add(at - e)
    }

    /// A control word for this channel (not a latch command): new mode and access; counting stops until a count is
    /// written.
    pub(super) fn write_control(&mut self, access: PitAccess, mode: u8, bcd: bool) {
        let gate = self.s.gate;
        self.s = PitChannelState {
            access,
            mode: normalize_mode(mode),
            bcd,
            initial_count: self.s.initial_count,
            gate,
            null_count: true,
            ..PitChannelState::default()
        };
        self.running_since = None;
    }

    /// A byte written to the channel's data port.
    pub(super) fn write_count(&mut self, value: u8, now: u64) {
        let count = match self.s.access {
            PitAccess::LowByte => u16::from(value),
            PitAccess::HighByte => u16::from(value) << 8,
            PitAccess::LowHigh => match self.s.write_low.take() {
                Some(low) => u16::from_le_bytes([low, value]),
                None => {
                    self.s.write_low = Some(value);
                    // Mode 0 stops counting on the first byte (its output goes low).
                    if self.s.mode == 0 {
                        self.s.count_written = false;
                        self.restart(now);
                    }
                    return;
                }
            },
        };
        self.s.initial_count = count;
        self.s.count_written = true;
        if gate_triggered(self.s.mode) {
            // Armed: the next rising edge of the gate loads the count.
            self.s.triggered = false;
            self.s.null_count = true;
        } else {
            self.s.null_count = false;
        }
        self.restart(now);
    }

    /// A read of the channel's data port: a latched status, a latched count, or the live count, byte by byte as the
    /// access mode says.
    pub(super) fn read(&mut self, now: u64) -> u8 {
        if let Some(status) = self.s.latched_status.take() {
            return status;
        }
        let (value, latched) = match self.s.latched_count {
            Some(latched) => (latched, true),
            None => (self.count(now), false),
        };
        let [low, high] = value.to_le_bytes();
        let (byte, done) = match self.s.access {
            PitAccess::LowByte => (low, true),
            PitAccess::HighByte => (high, true),
            PitAccess::LowHigh if self.s.read_high_next => (high, true),
            PitAccess::LowHigh => (low, false),
        };
        self.s.read_high_next = !done;
        if latched && done {
            self.s.latched_count = None;
        }
        byte
    }

    /// The counter latch command (and the count part of read-back): a latch already held stays.
    pub(super) fn latch_count(&mut self, now: u64) {
        if self.s.latched_count.is_none() {
            self.s.latched_count = Some(self.count(now));
        }
    }

    /// The status part of the read-back command.
    pub(super) fn latch_status(&mut self, now: u64) {
        if self.s.latched_status.is_none() {
            self.s.latched_status = Some(self.status(now));
        }
    }

    /// Sets the gate input.
    pub(super) fn set_gate(&mut self, level: bool, now: u64) {
        if level == self.s.gate {
            return;
        }
        self.s.gate = level;
        match self.s.mode {
            // A rising edge triggers the one-shot (again).
            1 | 5 if level && self.s.count_written => {
                self.s.triggered = true;
                self.s.null_count = false;
                self.restart(now);
            }
            // A low gate stops the rate generators; a rising edge reloads them.
            2 | 3 if level => self.restart(now),
            // Modes 0 and 4 pause while the gate is low.
            _ => self.sync_running(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn programmed(mode: u8, count: u16, now: u64) -> Channel {
        let mut ch = Channel::from_state(
            &PitChannelState {
                gate: true,
                ..PitChannelState::default()
            },
            0,
        );
        ch.write_control(PitAccess::LowHigh, mode, false);
        let [low, high] = count.to_le_bytes();
        ch.write_count(low, now);
        ch.write_count(high, now);
        ch
    }

    #[test]
    fn mode2_counts_down_and_reloads() {
        let ch = programmed(2, 100, 1000);
        assert_eq!(ch.count(1000), 100);
        assert_eq!(ch.count(1001), 99);
        assert_eq!(ch.count(1099), 1);
        assert!(!ch.output(1099), "low for the tick at count 1");
        assert!(ch.output(1098));
        assert_eq!(ch.count(1100), 100);
        assert!(ch.output(1100));
        assert_eq!(ch.count(1150), 50);
        assert_eq!(ch.next_rising_edge(1000), Some(1100));
        assert_eq!(ch.next_rising_edge(1100), Some(1200));
        assert_eq!(ch.next_rising_edge(1234), Some(1300));
    }

    #[test]
    fn count_zero_is_65536() {
        let ch = programmed(2, 0, 0);
        assert_eq!(ch.count(0), 0);
        assert_eq!(ch.count(1), 0xffff);
        assert_eq!(ch.next_rising_edge(0), Some(0x1_0000));
    }

    #[test]
    fn mode3_square_wave() {
        let ch = programmed(3, 10, 0);
        let levels: Vec<bool> = (0..20).map(|t| ch.output(t)).collect();
        assert_eq!(
            &levels[..10],
            &[true, true, true, true, true, false, false, false, false, false]
        );
        assert_eq!(&levels[..10], &levels[10..]);
        assert_eq!(ch.count(0), 10);
        assert_eq!(ch.count(1), 8);
        assert_eq!(ch.count(4), 2);
        assert_eq!(ch.count(5), 10);
        // Odd counts: high one tick longer than low.
        let odd = programmed(3, 5, 0);
        let levels: Vec<bool> = (0..5).map(|t| odd.output(t)).collect();
        assert_eq!(levels, [true, true, true, false, false]);
        assert_eq!(ch.next_rising_edge(3), Some(10));
    }

    #[test]
    fn mode0_interrupt_on_terminal_count() {
        let ch = programmed(0, 50, 10);
        assert!(!ch.output(10));
        assert!(!ch.output(59));
        assert!(ch.output(60));
        assert!(ch.output(10_000), "stays high");
        assert_eq!(ch.count(59), 1);
        assert_eq!(ch.count(60), 0);
        assert_eq!(ch.count(61), 0xffff, "keeps counting, wrapping");
        assert_eq!(ch.next_rising_edge(10), Some(60));
        assert_eq!(ch.next_rising_edge(60), None);
    }

    #[test]
    fn mode4_strobe() {
        let ch = programmed(4, 3, 0);
        let levels: Vec<bool> = (0..6).map(|t| ch.output(t)).collect();
        assert_eq!(levels, [true, true, true, false, true, true]);
        assert_eq!(ch.next_rising_edge(0), Some(4));
        assert_eq!(ch.next_rising_edge(4), None);
    }

    #[test]
    fn gate_triggered_one_shot() {
        let mut ch = programmed(1, 5, 0);
        // Armed, waiting for the gate: output high, not counting.
        assert!(ch.output(100));
        assert_eq!(ch.next_rising_edge(100), None);
        ch.set_gate(false, 100);
        ch.set_gate(true, 200);
        assert!(!ch.output(200));
        assert!(ch.output(205));
        assert_eq!(ch.next_rising_edge(200), Some(205));
        // Retriggering starts over.
        ch.set_gate(false, 203);
        ch.set_gate(true, 204);
        assert!(!ch.output(205));
        assert!(ch.output(209));
    }

    #[test]
    fn low_gate_pauses_mode0() {
        let mut ch = programmed(0, 10, 0);
        ch.set_gate(false, 4);
        assert_eq!(ch.count(100), 6);
        assert_eq!(ch.next_rising_edge(100), None);
        ch.set_gate(true, 100);
        assert_eq!(ch.count(105), 1);
        assert!(ch.output(106));
    }

    #[test]
    fn first_byte_stops_mode0() {
        let mut ch = programmed(0, 10, 0);
        assert!(ch.output(20));
        ch.write_count(5, 20);
        assert!(!ch.output(20));
        assert!(!ch.output(100), "nothing counts until the second byte");
        ch.write_count(0, 100);
        assert!(ch.output(105));
    }
}
