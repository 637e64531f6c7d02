//! vCPUs: creation and boot configuration, one thread each, run as an explicit state machine
//! (`Running` ⇄ `Paused` → `Finished`), driven by [`VcpuEvent`]s from the control loop.
//!
//! A thread in `KVM_RUN` is interrupted by a signal (`SIGRTMIN`, whose handler does nothing) so it can look at its
//! event queue; the sender repeats the kick until the thread answers, so a signal that lands just before `KVM_RUN`
//! cannot be lost.

use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use arch::BootProtocol;
use hypervisor::x86_64::CpuIdEntry;
use hypervisor::{Vcpu, VmExit, INTERNAL_ERROR_EMULATION};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::events::{StopReason, VmEvents};
use crate::io::IoDispatch;

/// Errors creating or configuring vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// The hypervisor refused a vCPU operation.
    #[error("vCPU {id}: {source}")]
    Hypervisor {
        /// The vCPU.
        id: u32,
        /// What failed.
        #[source]
        source: hypervisor::HypervisorError,
    },
    /// Writing boot structures for the vCPU failed.
    #[error("vCPU {id}: cannot set up boot registers: {reason}")]
    Boot {
        /// The vCPU.
        id: u32,
        /// What failed.
        reason: String,
    },
    /// The vCPU thread could not be started.
    #[error("cannot start the thread for vCPU {id}: {source}")]
    Thread {
        /// The vCPU.
        id: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What the control loop asks of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Stop entering the guest until `Resume`.
    Pause,
    /// Enter the guest again.
    Resume,
    /// Leave the thread.
    Finish,
}

/// A vCPU thread's answer to an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuResponse {
    /// Now paused.
    Paused,
    /// Now running.
    Resumed,
    /// The thread is ending.
    Finished,
}

/// What the exit dispatcher decided.
enum ExitAction {
    /// Enter the guest again.
    Continue,
    /// Check the event queue (a kick arrived).
    CheckEvents,
    /// The VM is stopping: stop entering the guest and wait for `Finish`.
    Stop(StopReason),
}

/// Everything a vCPU thread shares with the rest of the VM.
pub struct VcpuContext {
    /// Port/MMIO routing.
    pub io: Arc<IoDispatch>,
    /// Where stop reasons go.
    pub events: Arc<VmEvents>,
    /// The user-space IOAPIC (for EOIs of level-triggered interrupts).
    pub ioapic: Arc<Mutex<devices::ioapic::Ioapic>>,
    /// Whether a triple fault resets the VM rather than ending it as a crash.
    pub triple_fault_resets: bool,
    /// The legacy PIC, whose interrupts go to vCPU 0 as ExtINT (firmware boots only).
    pub extint: Option<Arc<dyn ExtIntSource>>,
    /// Kicks vCPU 0 out of KVM_RUN when the PIC has something for it.
    pub boot_vcpu_kicker: Arc<VcpuKicker>,
}

/// A legacy interrupt controller (8259 PIC) wired to the boot vCPU's LINT0.
pub trait ExtIntSource: Send + Sync {
    /// Whether the controller's interrupt output is asserted.
    fn pending(&self) -> bool;
    /// The interrupt acknowledge cycle: the vector to deliver (None if the request went away).
    fn acknowledge(&self) -> Option<u8>;
}

/// Interrupts one vCPU thread's KVM_RUN (the thread registers itself while it runs). A kick that lands between the
/// thread's last look at the interrupt controller and its entry into KVM_RUN is not lost: the signal handler sets the
/// vCPU's immediate-exit flag, so KVM_RUN returns at once and the thread looks again.
#[derive(Default)]
pub struct VcpuKicker {
    thread: Mutex<Option<libc::pthread_t>>,
}

impl VcpuKicker {
    /// Interrupts the registered thread's KVM_RUN, if a thread is registered.
    pub fn kick(&self) {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(thread) = *thread {
            // SAFETY: the thread is registered only between `register` and `unregister`, both called by the thread
            // itself while it runs, and the lock is held here, so the id names a live thread; the kick signal's
            // handler does nothing, so it cannot kill the process.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    fn register(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(me);
    }

    fn unregister(&self) {
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The signal that kicks a vCPU out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// The immediate-exit flag of the vCPU this thread runs (null on other threads).
    static IMMEDIATE_EXIT: std::cell::Cell<*mut u8> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// The kick: makes this thread's vCPU leave (or not enter) KVM_RUN. The signal itself interrupts a running KVM_RUN;
/// setting the immediate-exit flag covers a kick that lands just before the thread enters it.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(std::cell::Cell::get);
    if !flag.is_null() {
        // SAFETY: the pointer was registered by this thread from its own vCPU, which outlives the registration (it
        // is cleared before the vCPU leaves the thread); a volatile byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// The control loop's handle on one vCPU thread.
pub struct VcpuHandle {
    id: u32,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<Box<dyn Vcpu>>>,
}

impl VcpuHandle {
    /// The vCPU's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends `event` and kicks the thread until it answers. Returns `None` if the thread is gone.
    pub fn send(&self, event: VcpuEvent) -> Option<VcpuResponse> {
        self.events.send(event).ok()?;
        let thread = self.thread.as_ref()?;
        loop {
            // SAFETY: the pthread id belongs to a thread we have not joined yet, so it is valid; the kick signal has
            // a handler installed that does nothing, so delivering it cannot kill the process.
            let rc = unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
            if rc != 0 {
                return None;
            }
            match self.responses.recv_timeout(Duration::from_millis(2)) {
                Ok(r) => return Some(r),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Asks the thread to finish, joins it, and gives back the vCPU (KVM cannot destroy a vCPU, so a hot-removed
    /// one is parked for reuse).
    pub fn finish(mut self) -> Option<Box<dyn Vcpu>> {
        self.finish_inner()
    }

    fn finish_inner(&mut self) -> Option<Box<dyn Vcpu>> {
        if self.thread.is_some() {
            let _ = self.send(VcpuEvent::Finish);
        }
        let thread = self.thread.take()?;
        match thread.join() {
            Ok(vcpu) => Some(vcpu),
            Err(_) => {
                tracing::error!("vCPU {} thread panicked", self.id);
                None
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        let _ = self.finish_inner();
    }
}

/// How the boot vCPU starts.
pub struct BootEntry {
    /// First instruction.
    pub entry: GuestAddress,
    /// Entry convention.
    pub protocol: BootProtocol,
}

/// Creates vCPU `id`, applies CPUID, MSRs, FPU and LAPIC setup, and for the boot vCPU its entry registers.
pub fn create_vcpu(
    vm: &Arc<dyn hypervisor::Vm>,
    id: u32,
    cpu_count: u32,
    base_cpuid: &[CpuIdEntry],
    mem: &GuestMemoryMmap,
    boot: Option<&BootEntry>,
) -> Result<Box<dyn Vcpu>, CpuError> {
    let hv = |source| CpuError::Hypervisor { id, source };
    let vcpu = vm.create_vcpu(id).map_err(hv)?;
    let mut cpuid = base_cpuid.to_vec();
    arch::cpuid::filter(&mut cpuid, id, cpu_count);
    vcpu.set_cpuid(&cpuid).map_err(hv)?;
    vcpu.set_msrs(&arch::regs::boot_msrs()).map_err(hv)?;
    vcpu.set_fpu(&arch::regs::setup_fpu()).map_err(hv)?;
    let mut lapic = vcpu.lapic().map_err(hv)?;
    arch::regs::set_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(hv)?;
    if let Some(boot) = boot {
        vcpu.set_regs(&arch::regs::setup_regs(boot.entry, boot.protocol))
            .map_err(hv)?;
        let mut sregs = vcpu.sregs().map_err(hv)?;
        arch::regs::setup_sregs(mem, &mut sregs, boot.protocol).map_err(|e| CpuError::Boot {
            id,
            reason: e.to_string(),
        })?;
        vcpu.set_sregs(&sregs).map_err(hv)?;
    }
    Ok(vcpu)
}

/// Starts the thread that runs `vcpu`.
pub fn spawn_vcpu(
    id: u32,
    vcpu: Box<dyn Vcpu>,
    ctx: Arc<VcpuContext>,
) -> Result<VcpuHandle, CpuError> {
    install_kick_handler();
    let (event_tx, event_rx) = channel();
    let (resp_tx, resp_rx) = channel();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            VcpuThread {
                id,
                vcpu,
                ctx,
                events: event_rx,
                responses: resp_tx,
            }
            .run()
        })
        .map_err(|source| CpuError::Thread { id, source })?;
    Ok(VcpuHandle {
        id,
        events: event_tx,
        responses: resp_rx,
        thread: Some(thread),
    })
}

struct VcpuThread {
    id: u32,
    vcpu: Box<dyn Vcpu>,
    ctx: Arc<VcpuContext>,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuResponse>,
}

impl VcpuThread {
    /// The state machine: `Running` enters the guest; `Paused` and `Stopped` wait for events.
    fn run(mut self) -> Box<dyn Vcpu> {
        let flag = self
            .vcpu
            .immediate_exit_flag()
            .unwrap_or(std::ptr::null_mut());
        IMMEDIATE_EXIT.with(|f| f.set(flag));
        let kicker =
            (self.id == 0 && self.ctx.extint.is_some()).then(|| self.ctx.boot_vcpu_kicker.clone());
        if let Some(k) = &kicker {
            k.register();
        }
        let mut vcpu = self.run_states();
        if let Some(k) = &kicker {
            k.unregister();
        }
        IMMEDIATE_EXIT.with(|f| f.set(std::ptr::null_mut()));
        vcpu.set_immediate_exit(false);
        vcpu
    }

    fn run_states(mut self) -> Box<dyn Vcpu> {
        #[derive(PartialEq)]
        enum State {
            Running,
            Paused,
            Stopped,
        }
        let mut state = State::Running;
        loop {
            // Drain events without blocking while running; block while paused or stopped.
            let event = if state == State::Running {
                self.events.try_recv().ok()
            } else {
                match self.events.recv() {
                    Ok(e) => Some(e),
                    Err(_) => return self.vcpu,
                }
            };
            if let Some(event) = event {
                let response = match event {
                    VcpuEvent::Pause => {
                        if state == State::Running {
                            state = State::Paused;
                        }
                        VcpuResponse::Paused
                    }
                    VcpuEvent::Resume => {
                        if state == State::Paused {
                            state = State::Running;
                        }
                        VcpuResponse::Resumed
                    }
                    VcpuEvent::Finish => {
                        let _ = self.responses.send(VcpuResponse::Finished);
                        return self.vcpu;
                    }
                };
                let _ = self.responses.send(response);
                continue;
            }
            match self.dispatch_exit() {
                ExitAction::Continue | ExitAction::CheckEvents => {}
                ExitAction::Stop(reason) => {
                    self.ctx.events.raise(reason);
                    state = State::Stopped;
                }
            }
        }
    }

    /// Runs the vCPU once and decides what its exit means. This is the one place vCPU exits are interpreted.
    fn dispatch_exit(&mut self) -> ExitAction {
        if self.id == 0 {
            if let Err(e) = self.inject_pic_interrupt() {
                return ExitAction::Stop(StopReason::VcpuError(format!("vCPU {}: {e}", self.id)));
            }
        }
        let exit = match self.vcpu.run(self.ctx.io.as_ref()) {
            Ok(exit) => exit,
            Err(e) => {
                return ExitAction::Stop(StopReason::VcpuError(format!("vCPU {}: {e}", self.id)))
            }
        };
        match exit {
            VmExit::Handled => ExitAction::Continue,
            VmExit::Interrupted => {
                // A kick set the immediate-exit flag (or interrupted KVM_RUN): clear it before entering again.
                self.vcpu.set_immediate_exit(false);
                ExitAction::CheckEvents
            }
            // The guest can take the PIC's interrupt now: the next pass through the loop injects it.
            VmExit::IrqWindowOpen => ExitAction::Continue,
            VmExit::IoapicEoi(vector) => {
                self.ctx
                    .ioapic
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .end_of_interrupt(vector);
                ExitAction::Continue
            }
            // With an in-kernel LAPIC, HLT is handled by KVM; a user-space HLT exit just means "run again".
            VmExit::Hlt => ExitAction::Continue,
            VmExit::Reset => ExitAction::Stop(StopReason::Reset),
            VmExit::PowerOff => ExitAction::Stop(StopReason::PowerOff),
            VmExit::Shutdown if self.ctx.triple_fault_resets => ExitAction::Stop(StopReason::Reset),
            VmExit::Shutdown => ExitAction::Stop(StopReason::TripleFault {
                vcpu: self.id,
                registers: self.registers(),
            }),
            VmExit::InternalError { suberror, data } => {
                let what = if suberror == INTERNAL_ERROR_EMULATION {
                    "emulation failure (KVM could not emulate an instruction)".to_string()
                } else {
                    format!("KVM internal error (suberror {suberror})")
                };
                let data: Vec<String> = data.iter().map(|d| format!("{d:#x}")).collect();
                ExitAction::Stop(StopReason::GuestCrash {
                    vcpu: self.id,
                    reason: format!("{what}; data [{}]", data.join(", ")),
                    registers: self.registers(),
                })
            }
            VmExit::FailEntry { reason } => ExitAction::Stop(StopReason::GuestCrash {
                vcpu: self.id,
                reason: format!("VM entry failed (hardware reason {reason:#x})"),
                registers: self.registers(),
            }),
            VmExit::Unsupported(what) => ExitAction::Stop(StopReason::GuestCrash {
                vcpu: self.id,
                reason: format!("unhandled vCPU exit {what}"),
                registers: self.registers(),
            }),
        }
    }

    fn registers(&self) -> String {
        format_registers(self.vcpu.as_ref())
    }

    /// Before entering the guest: hands a pending PIC interrupt to the vCPU if it can take one now, and otherwise asks
    /// for an exit as soon as it can.
    fn inject_pic_interrupt(&mut self) -> Result<(), hypervisor::HypervisorError> {
        let Some(pic) = &self.ctx.extint else {
            return Ok(());
        };
        if !pic.pending() {
            self.vcpu.request_interrupt_window(false);
            return Ok(());
        }
        if self.vcpu.ready_for_interrupt_injection() {
            if let Some(vector) = pic.acknowledge() {
                self.vcpu.inject_external_interrupt(vector)?;
            }
        }
        // Another request may be waiting behind the one just injected (or the guest could not take one yet).
        self.vcpu.request_interrupt_window(pic.pending());
        Ok(())
    }
}

/// The vCPU's registers, formatted for a crash report.
pub fn format_registers(vcpu: &dyn Vcpu) -> String {
    let mut out = String::new();
    match vcpu.regs() {
        Ok(r) => {
            out += &format!(
                "rip={:#018x} rsp={:#018x} rflags={:#010x}\n\
                 rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
                 rsi={:#018x} rdi={:#018x} rbp={:#018x}\n\
                 r8={:#018x} r9={:#018x} r10={:#018x} r11={:#018x}\n\
                 r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}\n",
                r.rip,
                r.rsp,
                r.rflags,
                r.rax,
                r.rbx,
                r.rcx,
                r.rdx,
                r.rsi,
                r.rdi,
                r.rbp,
                r.r8,
                r.r9,
                r.r10,
                r.r11,
                r.r12,
                r.r13,
                r.r14,
                r.r15
            );
        }
        Err(e) => out += &format!("(general registers unavailable: {e})\n"),
    }
    match vcpu.sregs() {
        Ok(s) => {
            out += &format!(
                "cs={:#06x} base={:#x} ds={:#06x} ss={:#06x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                s.cs.selector, s.cs.base, s.ds.selector, s.ss.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            );
        }
        Err(e) => out += &format!("(special registers unavailable: {e})"),
    }
    out
}
