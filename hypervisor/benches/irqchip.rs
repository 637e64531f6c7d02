//! Measures one VM lifecycle (create VM, interrupt controller, a 2 MiB memory slot, one vCPU, teardown) with KVM's
//! full in-kernel irqchip against the split irqchip Atrium uses. Prints JSON. Run with `cargo bench -p hypervisor`.

use std::time::Instant;

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_SPLIT_IRQCHIP};
use kvm_ioctls::Kvm;

const RUNS: usize = 30;
const MEM: usize = 2 << 20;

fn lifecycle(kvm: &Kvm, full: bool, mem: *mut u8) -> f64 {
    let start = Instant::now();
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    if full {
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    } else {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = 24;
        vm.enable_cap(&cap).expect("KVM_CAP_SPLIT_IRQCHIP");
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: mem as u64,
    };
    // SAFETY: `mem` is a live 2 MiB mapping that outlives the VM (dropped at the end of this function).
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    drop(vcpu);
    drop(vm);
    start.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let Ok(kvm) = Kvm::new() else {
        eprintln!("no usable /dev/kvm; nothing measured");
        return;
    };
    // SAFETY: an anonymous private mapping; checked against MAP_FAILED below and never unmapped.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED);
    let mem = mem.cast::<u8>();
    let mut split = Vec::new();
    let mut full = Vec::new();
    for _ in 0..RUNS {
        split.push(lifecycle(&kvm, false, mem));
        full.push(lifecycle(&kvm, true, mem));
    }
    println!(
        "{{\"runs\": {RUNS}, \"split_irqchip_ms\": {:.3}, \"full_irqchip_ms\": {:.3}}}",
        median(split),
        median(full)
    );
}
