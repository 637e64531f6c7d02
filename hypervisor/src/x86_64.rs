//! x86_64 register and table types shared by the hypervisor backends and `arch`.
//!
//! They are the KVM layouts today; a second backend converts to and from them.

pub use kvm_bindings::{
    kvm_cpuid_entry2 as CpuIdEntry, kvm_dtable as DescriptorTable, kvm_fpu as FpuState,
    kvm_lapic_state as LapicState, kvm_msr_entry as MsrEntry, kvm_regs as StandardRegisters,
    kvm_segment as SegmentRegister, kvm_sregs as SpecialRegisters,
};

/// CPUID flag: the entry's `index` (sub-leaf) is significant.
pub const CPUID_FLAG_SIGNIFICANT_INDEX: u32 = kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
