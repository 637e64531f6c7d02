//! The hypervisor abstraction: `Hypervisor` creates `Vm`s, a `Vm` owns memory slots and creates `Vcpu`s, and
//! `Vcpu::run` reports why the guest stopped. Nothing here knows about the VMM: port and MMIO accesses are resolved
//! through the [`ExitHandler`] the caller passes to `run`.

pub mod x86_64;
