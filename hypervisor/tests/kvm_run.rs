//! Runs real guest bytes on /dev/kvm through the hypervisor traits.

use std::sync::Mutex;

use hypervisor::{ExitHandler, Hypervisor, KvmHypervisor, MemoryRegion, VmExit};

/// Opens KVM, or explains why not: a failure under CI, a loud skip elsewhere.
fn kvm() -> Option<KvmHypervisor> {
    match KvmHypervisor::new() {
        Ok(kvm) => Some(kvm),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("KVM required under CI: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: no usable /dev/kvm ({e})");
            None
        }
    }
}

#[derive(Default)]
struct Recorder {
    out: Mutex<Vec<(u16, Vec<u8>)>>,
}

impl ExitHandler for Recorder {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.out.lock().unwrap().push((port, data.to_vec()));
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

/// Maps `code` at guest address 0x1000 of a 64 KiB real-mode guest and returns the VM parts.
fn real_mode_guest(
    kvm: &KvmHypervisor,
    code: &[u8],
) -> (
    std::sync::Arc<dyn hypervisor::Vm>,
    Box<dyn hypervisor::Vcpu>,
    *mut u8,
) {
    real_mode_guest_with(kvm, code, false)
}

/// Like `real_mode_guest`; with `split_irqchip`, the vCPU gets an in-kernel local APIC (KVM's split irqchip).
fn real_mode_guest_with(
    kvm: &KvmHypervisor,
    code: &[u8],
    split_irqchip: bool,
) -> (
    std::sync::Arc<dyn hypervisor::Vm>,
    Box<dyn hypervisor::Vcpu>,
    *mut u8,
) {
    let vm = kvm.create_vm().unwrap();
    if split_irqchip {
        vm.create_split_irqchip(24).unwrap();
    }
    let size = 0x10000;
    // SAFETY: an anonymous private mapping with no preconditions; checked below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED);
    let mem = mem.cast::<u8>();
    // SAFETY: the mapping is `size` bytes long and `code` fits after offset 0x1000.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.add(0x1000), code.len()) };
    // SAFETY: the mapping stays alive (never unmapped) for the rest of the test process.
    unsafe {
        vm.set_memory_region(MemoryRegion {
            slot: 0,
            guest_addr: 0,
            size: size as u64,
            host_addr: mem as u64,
            readonly: false,
        })
    }
    .unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    (vm, vcpu, mem)
}

#[test]
fn port_io_reaches_the_exit_handler_and_hlt_exits() {
    let Some(kvm) = kvm() else { return };
    // mov al, 'A'; out 0x3f8 via dx; in al, dx; add al, 1; out dx, al; hlt
    let code = [
        0xb0, b'A', // mov al, 'A'
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
        0xec, // in al, dx
        0x04, 0x01, // add al, 1
        0xee, // out dx, al
        0xf4, // hlt
    ];
    let (_vm, mut vcpu, _mem) = real_mode_guest(&kvm, &code);
    let rec = Recorder::default();
    let mut exits = Vec::new();
    loop {
        let exit = vcpu.run(&rec).unwrap();
        if exit != VmExit::Handled {
            exits.push(exit);
            break;
        }
    }
    assert_eq!(exits, vec![VmExit::Hlt]);
    let out = rec.out.lock().unwrap();
    assert_eq!(*out, vec![(0x3f8, vec![b'A']), (0x3f8, vec![0x5b])]);
}

#[test]
fn immediate_exit_returns_interrupted() {
    let Some(kvm) = kvm() else { return };
    let code = [0xeb, 0xfe]; // jmp $
    let (_vm, mut vcpu, _mem) = real_mode_guest(&kvm, &code);
    vcpu.set_immediate_exit(true);
    let exit = vcpu.run(&Recorder::default()).unwrap();
    assert_eq!(exit, VmExit::Interrupted);
}

#[test]
fn external_interrupt_is_injected_when_the_guest_opens_its_interrupt_window() {
    let Some(kvm) = kvm() else { return };
    // At 0x1000: sti; nop; jmp $ (interrupts open after the instruction following sti).
    // At 0x1100, the handler of vector 0x20: mov al, 0x99; out 0x10, al; iret.
    let mut code = vec![0u8; 0x106];
    code[..4].copy_from_slice(&[0xfb, 0x90, 0xeb, 0xfe]);
    code[0x100..].copy_from_slice(&[0xb0, 0x99, 0xe6, 0x10, 0xcf, 0xf4]);
    let (_vm, mut vcpu, mem) = real_mode_guest_with(&kvm, &code, true);
    // Real-mode interrupt vector table entry 0x20 (at 0x80): offset 0x1100, segment 0.
    // SAFETY: the mapping is 64 KiB long; bytes 0x80..0x84 are inside it and nothing else writes them now.
    unsafe { std::ptr::copy_nonoverlapping([0x00u8, 0x11, 0, 0].as_ptr(), mem.add(0x80), 4) };
    let rec = Recorder::default();

    // Interrupts are off at reset: ask to be told when the guest can take one.
    vcpu.request_interrupt_window(true);
    let mut exit = VmExit::Handled;
    for _ in 0..100 {
        exit = vcpu.run(&rec).unwrap();
        if exit != VmExit::Handled {
            break;
        }
    }
    assert_eq!(exit, VmExit::IrqWindowOpen);
    assert!(vcpu.ready_for_interrupt_injection());
    vcpu.request_interrupt_window(false);
    vcpu.inject_external_interrupt(0x20).unwrap();
    // The guest takes vector 0x20 through LINT0 (ExtINT) and its handler writes 0x99 to port 0x10.
    for _ in 0..100 {
        if vcpu.run(&rec).unwrap() == VmExit::Handled && !rec.out.lock().unwrap().is_empty() {
            break;
        }
    }
    assert_eq!(*rec.out.lock().unwrap(), vec![(0x10, vec![0x99])]);
}

#[test]
fn a_write_through_the_immediate_exit_flag_makes_run_return_interrupted() {
    let Some(kvm) = kvm() else { return };
    let code = [0xeb, 0xfe]; // jmp $
    let (_vm, mut vcpu, _mem) = real_mode_guest(&kvm, &code);
    let flag = vcpu
        .immediate_exit_flag()
        .expect("KVM has an immediate-exit flag");
    // SAFETY: the flag lives in the vCPU's run mapping, alive as long as `vcpu`; no other reference to it exists.
    unsafe { std::ptr::write_volatile(flag, 1) };
    assert_eq!(vcpu.run(&Recorder::default()).unwrap(), VmExit::Interrupted);
}

#[test]
fn supported_cpuid_is_not_empty_and_max_vcpus_positive() {
    let Some(kvm) = kvm() else { return };
    assert!(!kvm.supported_cpuid().unwrap().is_empty());
    assert!(kvm.max_vcpus() >= 1);
}

#[test]
fn ioeventfd_catches_a_port_write_in_the_kernel() {
    let Some(kvm) = kvm() else { return };
    // mov dx, 0x3f0; mov al, 7; out dx, al; mov dx, 0x3f8; out dx, al; hlt
    let code = [
        0xba, 0xf0, 0x03, 0xb0, 0x07, 0xee, 0xba, 0xf8, 0x03, 0xee, 0xf4,
    ];
    let (vm, mut vcpu, _mem) = real_mode_guest(&kvm, &code);
    let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_ioevent(&evt, hypervisor::IoEventAddress::Pio(0x3f0), None)
        .unwrap();
    let rec = Recorder::default();
    while vcpu.run(&rec).unwrap() == VmExit::Handled {}
    // Only the write to 0x3f8 reached user space; the one to 0x3f0 signalled the eventfd.
    assert_eq!(*rec.out.lock().unwrap(), vec![(0x3f8, vec![7])]);
    assert_eq!(evt.read().unwrap(), 1);
    vm.unregister_ioevent(&evt, hypervisor::IoEventAddress::Pio(0x3f0), None)
        .unwrap();
}

#[test]
fn msi_routes_and_irqfds_register() {
    let Some(kvm) = kvm() else { return };
    let vm = kvm.create_vm().unwrap();
    vm.create_split_irqchip(24).unwrap();
    let routes = [
        hypervisor::MsiRoute {
            gsi: 24,
            address: 0xfee0_0000,
            data: 0x41,
        },
        hypervisor::MsiRoute {
            gsi: 25,
            address: 0xfee0_1000,
            data: 0x42,
        },
    ];
    vm.set_msi_routing(&routes).unwrap();
    let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&evt, 24).unwrap();
    vm.unregister_irqfd(&evt, 24).unwrap();
}
