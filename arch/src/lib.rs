//! Platform setup for booting a guest: everything the VMM writes into guest memory or vCPU
//! registers before the first instruction runs.
//!
//! The crate is a set of pure functions over [`vm_memory`] guest memory and the register types of
//! [`hypervisor`]; it never issues an ioctl. The VMM applies what these functions return.
//!
//! Only x86_64 exists today. Its code lives in the `x86_64` module and is re-exported at the crate
//! root, so another architecture can later sit beside it behind its own `cfg`.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;
