//! The CPU hotplug controller: which of the possible CPUs are present, and the insert / remove / eject handshake
//! with the guest.
//!
//! Registers (offsets from [`CPU_HOTPLUG_MMIO_BASE`]; other sizes and offsets read as zero and ignore writes):
//!
//! | offset | size | access | meaning |
//! |---|---|---|---|
//! | [`CPU_HOTPLUG_SELECT`] (0) | 32 | write | select a CPU by APIC ID |
//! | [`CPU_HOTPLUG_STATUS`] (4) | 8 | read/write | the selected CPU's status (see [`crate::hotplug`]) |
//! | [`CPU_HOTPLUG_COUNT`] (8) | 32 | read | number of possible CPUs (max vCPUs) |
//!
//! Selecting an ID at or above the count is allowed; the status then reads as zero and ignores writes.
//!
//! The VMM adds a CPU with [`CpuHotplugController::insert`] and asks for one to go with
//! [`CpuHotplugController::request_removal`], then raises the GED's CPU hotplug event. The guest acknowledges the
//! events, offlines a CPU and ejects it; the CPU stops being enabled at once (so `_STA` after `_EJ0` reads it
//! gone), the controller signals its eject eventfd, and the VMM collects the CPU with
//! [`CpuHotplugController::take_ejected`] and stops its vCPU. The guest may eject any enabled CPU but CPU 0, also
//! one the VMM did not ask for, as ACPI lets an OS eject a device on its own; CPU 0, the boot processor, is never
//! ejected nor removed.

use crate::bus::BusDevice;
use crate::hotplug::{byte, dword, put_byte, put_dword, EjectNotifier, SlotStatus};
use vmm_sys_util::eventfd::EventFd;

/// Guest-physical base address of the CPU hotplug controller.
pub const CPU_HOTPLUG_MMIO_BASE: u64 = 0xfe00_1000;
/// Length of the CPU hotplug controller's register block.
pub const CPU_HOTPLUG_MMIO_LEN: u64 = 0x10;
/// Offset of the 32-bit CPU selector (write).
pub const CPU_HOTPLUG_SELECT: u64 = 0;
/// Offset of the selected CPU's 8-bit status register.
pub const CPU_HOTPLUG_STATUS: u64 = 4;
/// Offset of the 32-bit count of possible CPUs (read).
pub const CPU_HOTPLUG_COUNT: u64 = 8;
/// The most CPUs the controller handles: xAPIC IDs 0..=254 (0xff is the broadcast ID).
pub const CPU_HOTPLUG_MAX_CPUS: u32 = 255;

/// Errors setting up the controller or changing a CPU from the VMM side.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuHotplugError {
    /// The number of possible CPUs is out of range.
    #[error("the CPU hotplug controller supports 1 to {CPU_HOTPLUG_MAX_CPUS} possible CPUs, not {0}; change the maximum vCPU count")]
    MaxCpus(usize),
    /// The number of boot CPUs is out of range.
    #[error("{boot} boot CPUs do not fit {max} possible CPUs; boot at least 1 and at most {max}")]
    BootCpus {
        /// Boot CPUs asked for.
        boot: u32,
        /// Possible CPUs.
        max: u32,
    },
    /// The CPU ID is not below the number of possible CPUs.
    #[error("CPU {id} does not exist: the controller's CPU IDs are below {max}; raise the maximum vCPU count")]
    NoSuchCpu {
        /// The CPU asked for.
        id: u32,
        /// Possible CPUs.
        max: u32,
    },
    /// The CPU is already enabled.
    #[error("CPU {0} is already present; remove it before adding it again")]
    AlreadyEnabled(u32),
    /// The CPU is not enabled.
    #[error("CPU {0} is not present; there is nothing to remove")]
    NotEnabled(u32),
    /// The guest ejected the CPU and the VMM has not collected it yet.
    #[error("CPU {0} was ejected by the guest and not yet collected; take the ejected CPUs and stop its vCPU first")]
    EjectPending(u32),
    /// CPU 0 cannot be removed.
    #[error("CPU 0 is the boot processor and cannot be removed")]
    BootProcessor,
}

/// The controller's guest-visible state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuHotplugState {
    /// The CPU the selector register holds (may be out of range).
    pub selected: u32,
    /// The status of every possible CPU, by APIC ID.
    pub cpus: Vec<SlotStatus>,
}

/// The CPU hotplug controller.
pub struct CpuHotplugController {
    state: CpuHotplugState,
    notifier: EjectNotifier,
}

impl CpuHotplugController {
    /// Creates a controller for `max_cpus` possible CPUs, of which CPUs `0..boot_cpus` are present from boot.
    pub fn new(max_cpus: u32, boot_cpus: u32) -> Result<Self, CpuHotplugError> {
        if max_cpus == 0 || max_cpus > CPU_HOTPLUG_MAX_CPUS {
            return Err(CpuHotplugError::MaxCpus(max_cpus as usize));
        }
        if boot_cpus == 0 || boot_cpus > max_cpus {
            return Err(CpuHotplugError::BootCpus {
                boot: boot_cpus,
                max: max_cpus,
            });
        }
        let cpus = (0..max_cpus)
            .map(|id| {
                if id < boot_cpus {
                    SlotStatus::PRESENT
                } else {
                    SlotStatus::default()
                }
            })
            .collect();
        Ok(CpuHotplugController {
            state: CpuHotplugState { selected: 0, cpus },
            notifier: EjectNotifier::default(),
        })
    }

    /// Rebuilds a controller from saved state, clearing status combinations no controller produces and keeping
    /// CPU 0 present. CPUs the state says were ejected stay queued for [`CpuHotplugController::take_ejected`].
    pub fn from_state(state: &CpuHotplugState) -> Result<Self, CpuHotplugError> {
        let count = state.cpus.len();
        if count == 0 || count > CPU_HOTPLUG_MAX_CPUS as usize {
            return Err(CpuHotplugError::MaxCpus(count));
        }
        let mut cpus: Vec<SlotStatus> = state.cpus.iter().map(|s| s.sanitized()).collect();
        if !cpus[0].enabled {
            cpus[0] = SlotStatus::PRESENT;
        }
        Ok(CpuHotplugController {
            state: CpuHotplugState {
                selected: state.selected,
                cpus,
            },
            notifier: EjectNotifier::default(),
        })
    }

    /// The current state.
    pub fn state(&self) -> CpuHotplugState {
        self.state.clone()
    }

    /// Sets the eventfd signalled each time the guest ejects a CPU (`None` to stop signalling). The VMM should
    /// create it non-blocking and poll it in its control loop.
    pub fn set_eject_notifier(&mut self, event: Option<EventFd>) {
        self.notifier.set(event);
    }

    /// The number of possible CPUs.
    pub fn max_cpus(&self) -> u32 {
        // At most CPU_HOTPLUG_MAX_CPUS entries, checked on construction.
        self.state.cpus.len() as u32
    }

    /// Makes CPU `id` present and raises its inserting event; the VMM then notifies the GED.
    pub fn insert(&mut self, id: u32) -> Result<(), CpuHotplugError> {
        let cpu = self.cpu_mut(id)?;
        if cpu.enabled {
            return Err(CpuHotplugError::AlreadyEnabled(id));
        }
        if cpu.ejected {
            return Err(CpuHotplugError::EjectPending(id));
        }
        *cpu = SlotStatus::INSERTED;
        Ok(())
    }

    /// Asks the guest to let go of CPU `id` by raising its removing event; the VMM then notifies the GED. Asking
    /// again raises the event again.
    pub fn request_removal(&mut self, id: u32) -> Result<(), CpuHotplugError> {
        if id == 0 {
            return Err(CpuHotplugError::BootProcessor);
        }
        let cpu = self.cpu_mut(id)?;
        if !cpu.enabled {
            return Err(CpuHotplugError::NotEnabled(id));
        }
        cpu.removing = true;
        Ok(())
    }

    /// The CPUs the guest ejected since the last call, in ascending order. They are no longer enabled; the VMM
    /// stops their vCPUs, after which they can be inserted again.
    pub fn take_ejected(&mut self) -> Vec<u32> {
        let mut ejected = Vec::new();
        for (id, cpu) in (0u32..).zip(self.state.cpus.iter_mut()) {
            if cpu.ejected {
                cpu.ejected = false;
                ejected.push(id);
            }
        }
        ejected
    }

    /// The enabled CPUs, in ascending order.
    pub fn enabled(&self) -> Vec<u32> {
        (0u32..)
            .zip(&self.state.cpus)
            .filter(|(_, cpu)| cpu.enabled)
            .map(|(id, _)| id)
            .collect()
    }

    fn cpu_mut(&mut self, id: u32) -> Result<&mut SlotStatus, CpuHotplugError> {
        let max = self.max_cpus();
        self.state
            .cpus
            .get_mut(id as usize)
            .ok_or(CpuHotplugError::NoSuchCpu { id, max })
    }

    fn write_status(&mut self, value: u8) {
        let id = self.state.selected;
        let Some(cpu) = self.state.cpus.get_mut(id as usize) else {
            tracing::debug!(
                "CPU hotplug: ignoring a status write for CPU {id}, which does not exist"
            );
            return;
        };
        if cpu.guest_write(value, id != 0) {
            tracing::info!("CPU hotplug: the guest ejected CPU {id}");
            self.notifier.notify("CPU hotplug");
        }
    }
}

impl BusDevice for CpuHotplugController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            CPU_HOTPLUG_STATUS => {
                let status = self
                    .state
                    .cpus
                    .get(self.state.selected as usize)
                    .map_or(0, |cpu| cpu.register());
                put_byte(data, status);
            }
            CPU_HOTPLUG_COUNT => put_dword(data, self.max_cpus()),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, dword(data), byte(data)) {
            (CPU_HOTPLUG_SELECT, Some(id), _) => self.state.selected = id,
            (CPU_HOTPLUG_STATUS, _, Some(value)) => self.write_status(value),
            _ => tracing::debug!(
                "CPU hotplug: ignoring a {}-byte write at offset {offset:#x}",
                data.len()
            ),
        }
    }
}

impl std::fmt::Debug for CpuHotplugController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuHotplugController")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hotplug::{
        TestRng, STATUS_EJECT, STATUS_ENABLED, STATUS_INSERTING, STATUS_REMOVING,
    };
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn select(c: &mut CpuHotplugController, id: u32) {
        c.write(CPU_HOTPLUG_SELECT, &id.to_le_bytes());
    }

    fn status(c: &mut CpuHotplugController, id: u32) -> u8 {
        select(c, id);
        let mut b = [0xffu8];
        c.read(CPU_HOTPLUG_STATUS, &mut b);
        b[0]
    }

    fn write_status(c: &mut CpuHotplugController, id: u32, value: u8) {
        select(c, id);
        c.write(CPU_HOTPLUG_STATUS, &[value]);
    }

    fn with_eventfd(max: u32, boot: u32) -> (CpuHotplugController, EventFd) {
        let mut c = CpuHotplugController::new(max, boot).unwrap();
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        c.set_eject_notifier(Some(event.try_clone().unwrap()));
        (c, event)
    }

    #[test]
    fn layout_matches_the_design() {
        assert_eq!(
            (CPU_HOTPLUG_MMIO_BASE, CPU_HOTPLUG_MMIO_LEN),
            (0xfe00_1000, 0x10)
        );
    }

    #[test]
    fn construction_bounds() {
        assert_eq!(
            CpuHotplugController::new(0, 0).unwrap_err(),
            CpuHotplugError::MaxCpus(0)
        );
        assert_eq!(
            CpuHotplugController::new(256, 1).unwrap_err(),
            CpuHotplugError::MaxCpus(256)
        );
        assert_eq!(
            CpuHotplugController::new(4, 0).unwrap_err(),
            CpuHotplugError::BootCpus { boot: 0, max: 4 }
        );
        assert_eq!(
            CpuHotplugController::new(4, 5).unwrap_err(),
            CpuHotplugError::BootCpus { boot: 5, max: 4 }
        );
        let c = CpuHotplugController::new(255, 255).unwrap();
        assert_eq!(c.enabled().len(), 255);
        let c = CpuHotplugController::new(8, 2).unwrap();
        assert_eq!(c.enabled(), [0, 1]);
        assert_eq!(c.max_cpus(), 8);
    }

    #[test]
    fn count_register_and_boot_status() {
        let mut c = CpuHotplugController::new(8, 2).unwrap();
        let mut count = [0u8; 4];
        c.read(CPU_HOTPLUG_COUNT, &mut count);
        assert_eq!(u32::from_le_bytes(count), 8);
        assert_eq!(status(&mut c, 0), STATUS_ENABLED);
        assert_eq!(status(&mut c, 1), STATUS_ENABLED);
        assert_eq!(status(&mut c, 2), 0);
        assert_eq!(status(&mut c, 7), 0);
        // The count is read-only.
        c.write(CPU_HOTPLUG_COUNT, &1u32.to_le_bytes());
        c.read(CPU_HOTPLUG_COUNT, &mut count);
        assert_eq!(u32::from_le_bytes(count), 8);
    }

    #[test]
    fn selector_out_of_range_reads_zero_and_ignores_writes() {
        let mut c = CpuHotplugController::new(4, 4).unwrap();
        for id in [4, 255, u32::MAX] {
            assert_eq!(status(&mut c, id), 0);
            write_status(&mut c, id, 0xff);
            assert_eq!(c.state().selected, id);
        }
        assert_eq!(c.enabled(), [0, 1, 2, 3]);
        assert!(c.take_ejected().is_empty());
    }

    #[test]
    fn wrong_access_sizes_are_ignored() {
        let mut c = CpuHotplugController::new(4, 2).unwrap();
        select(&mut c, 1);
        // A byte or word write to the selector does not select.
        c.write(CPU_HOTPLUG_SELECT, &[3]);
        c.write(CPU_HOTPLUG_SELECT, &[3, 0]);
        assert_eq!(c.state().selected, 1);
        // A 32-bit status write is not an eject.
        c.write(CPU_HOTPLUG_STATUS, &u32::from(STATUS_EJECT).to_le_bytes());
        assert_eq!(c.enabled(), [0, 1]);
        // Reads of other sizes, of the write-only selector and of unused offsets are zero.
        for (offset, len) in [
            (CPU_HOTPLUG_STATUS, 4),
            (CPU_HOTPLUG_STATUS, 2),
            (CPU_HOTPLUG_COUNT, 1),
            (CPU_HOTPLUG_COUNT, 8),
            (CPU_HOTPLUG_SELECT, 4),
            (5, 1),
            (12, 4),
        ] {
            let mut data = vec![0xffu8; len];
            c.read(offset, &mut data);
            assert!(data.iter().all(|b| *b == 0), "{offset}/{len}");
        }
    }

    #[test]
    fn insert_then_guest_acknowledges() {
        let (mut c, event) = with_eventfd(4, 1);
        c.insert(2).unwrap();
        assert_eq!(c.enabled(), [0, 2]);
        assert_eq!(status(&mut c, 2), STATUS_ENABLED | STATUS_INSERTING);
        // Writing 1 to the enabled bit changes nothing.
        write_status(&mut c, 2, STATUS_ENABLED);
        assert_eq!(status(&mut c, 2), STATUS_ENABLED | STATUS_INSERTING);
        write_status(&mut c, 2, STATUS_INSERTING);
        assert_eq!(status(&mut c, 2), STATUS_ENABLED);
        assert!(event.read().is_err(), "no eject was signalled");
    }

    #[test]
    fn insert_errors() {
        let mut c = CpuHotplugController::new(4, 2).unwrap();
        assert_eq!(c.insert(1), Err(CpuHotplugError::AlreadyEnabled(1)));
        let err = c.insert(4).unwrap_err();
        assert_eq!(err, CpuHotplugError::NoSuchCpu { id: 4, max: 4 });
        assert!(err.to_string().contains("below 4"), "{err}");
        c.insert(3).unwrap();
        assert_eq!(c.insert(3), Err(CpuHotplugError::AlreadyEnabled(3)));
    }

    #[test]
    fn removal_request_acknowledge_and_eject() {
        let (mut c, event) = with_eventfd(4, 3);
        c.request_removal(2).unwrap();
        assert_eq!(status(&mut c, 2), STATUS_ENABLED | STATUS_REMOVING);
        // The AML acknowledges the event when it notifies the OS, which later ejects the CPU.
        write_status(&mut c, 2, STATUS_REMOVING);
        assert_eq!(status(&mut c, 2), STATUS_ENABLED);
        assert!(c.take_ejected().is_empty());
        write_status(&mut c, 2, STATUS_EJECT);
        // Gone for the guest at once, before the VMM collects it.
        assert_eq!(status(&mut c, 2), 0);
        assert_eq!(c.enabled(), [0, 1]);
        assert_eq!(event.read().unwrap(), 1);
        // It cannot come back before the VMM collected it.
        assert_eq!(c.insert(2), Err(CpuHotplugError::EjectPending(2)));
        assert_eq!(c.take_ejected(), [2]);
        assert!(c.take_ejected().is_empty());
        c.insert(2).unwrap();
        assert_eq!(c.enabled(), [0, 1, 2]);
    }

    #[test]
    fn guest_may_eject_unrequested_cpus_but_not_cpu_0() {
        let (mut c, event) = with_eventfd(4, 4);
        write_status(&mut c, 0, STATUS_EJECT);
        assert_eq!(status(&mut c, 0), STATUS_ENABLED);
        assert!(event.read().is_err());
        write_status(&mut c, 3, STATUS_EJECT);
        write_status(&mut c, 1, STATUS_EJECT | STATUS_INSERTING);
        // Ejecting an already ejected CPU does not signal again.
        write_status(&mut c, 1, STATUS_EJECT);
        assert_eq!(event.read().unwrap(), 2);
        assert_eq!(c.take_ejected(), [1, 3]);
        assert_eq!(c.enabled(), [0, 2]);
    }

    #[test]
    fn removal_errors() {
        let mut c = CpuHotplugController::new(4, 2).unwrap();
        assert_eq!(c.request_removal(0), Err(CpuHotplugError::BootProcessor));
        assert_eq!(c.request_removal(2), Err(CpuHotplugError::NotEnabled(2)));
        assert_eq!(
            c.request_removal(9),
            Err(CpuHotplugError::NoSuchCpu { id: 9, max: 4 })
        );
        // Asking twice raises the event again after the guest acknowledged it.
        c.request_removal(1).unwrap();
        write_status(&mut c, 1, STATUS_REMOVING);
        c.request_removal(1).unwrap();
        assert_eq!(status(&mut c, 1), STATUS_ENABLED | STATUS_REMOVING);
    }

    #[test]
    fn ejects_queue_without_a_notifier() {
        let mut c = CpuHotplugController::new(2, 2).unwrap();
        write_status(&mut c, 1, STATUS_EJECT);
        assert_eq!(c.take_ejected(), [1]);
    }

    #[test]
    fn state_round_trip() {
        let mut c = CpuHotplugController::new(6, 2).unwrap();
        c.insert(4).unwrap();
        c.request_removal(1).unwrap();
        c.insert(5).unwrap();
        write_status(&mut c, 5, STATUS_EJECT);
        let state = c.state();
        let mut restored = CpuHotplugController::from_state(&state).unwrap();
        assert_eq!(restored.state(), state);
        assert_eq!(restored.take_ejected(), [5]);
        assert_eq!(status(&mut restored, 4), STATUS_ENABLED | STATUS_INSERTING);

        let mut odd = state.clone();
        odd.cpus[0] = SlotStatus::default();
        odd.cpus[2] = SlotStatus {
            removing: true,
            ..SlotStatus::default()
        };
        odd.cpus[3] = SlotStatus {
            enabled: true,
            ejected: true,
            ..SlotStatus::default()
        };
        let cleaned = CpuHotplugController::from_state(&odd).unwrap().state();
        assert_eq!(cleaned.cpus[0], SlotStatus::PRESENT);
        assert_eq!(cleaned.cpus[2], SlotStatus::default());
        assert!(!cleaned.cpus[3].enabled && cleaned.cpus[3].ejected);

        let empty = CpuHotplugState {
            selected: 0,
            cpus: Vec::new(),
        };
        assert_eq!(
            CpuHotplugController::from_state(&empty).unwrap_err(),
            CpuHotplugError::MaxCpus(0)
        );
        let huge = CpuHotplugState {
            selected: 0,
            cpus: vec![SlotStatus::PRESENT; 300],
        };
        assert_eq!(
            CpuHotplugController::from_state(&huge).unwrap_err(),
            CpuHotplugError::MaxCpus(300)
        );
    }

    #[test]
    fn random_accesses_never_panic() {
        let (mut c, event) = with_eventfd(8, 2);
        let mut rng = TestRng::new(0xc9a);
        for _ in 0..20_000 {
            let offset = rng.offset(CPU_HOTPLUG_MMIO_LEN);
            let mut data = rng.access();
            let id = rng.below(10) as u32;
            match rng.below(6) {
                0 => c.read(offset, &mut data),
                1 => c.write(offset, &data),
                2 => write_status(&mut c, id, rng.next() as u8),
                3 => {
                    let _ = c.insert(id);
                }
                4 => {
                    let _ = c.request_removal(id);
                }
                _ => {
                    for gone in c.take_ejected() {
                        assert!(gone != 0 && gone < 8);
                    }
                }
            }
            let state = c.state();
            assert_eq!(state.cpus.len(), 8);
            assert_eq!(state.cpus[0].register() & STATUS_ENABLED, STATUS_ENABLED);
            assert!(state.cpus.iter().all(|s| *s == s.sanitized()));
        }
        let _ = event.read();
    }
}
