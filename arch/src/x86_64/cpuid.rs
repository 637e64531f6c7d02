//! Per-vCPU CPUID: what KVM supports, adjusted so each vCPU sees its own APIC ID, a flat topology
//! of `cpu_count` single-threaded cores in one package, and the hypervisor bit.

use hypervisor::x86_64::{CpuIdEntry, CPUID_FLAG_SIGNIFICANT_INDEX};

const LEAF_MAX_BASIC: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;

// Leaf 1.
const EBX_APIC_ID_SHIFT: u32 = 24;
const EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
const EBX_LOGICAL_COUNT_MASK: u32 = 0xff << EBX_LOGICAL_COUNT_SHIFT;
const EBX_APIC_ID_MASK: u32 = 0xff << EBX_APIC_ID_SHIFT;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

// Leaf 4 EAX.
const CACHE_TYPE_MASK: u32 = 0x1f;
const CACHE_LEVEL_SHIFT: u32 = 5;
const CACHE_LEVEL_MASK: u32 = 0x7;
const CACHE_SHARING_SHIFT: u32 = 14;
const CACHE_SHARING_MASK: u32 = 0xfff << CACHE_SHARING_SHIFT;
const CORES_PER_PACKAGE_SHIFT: u32 = 26;
const CORES_PER_PACKAGE_MASK: u32 = 0x3f << CORES_PER_PACKAGE_SHIFT;

// Leaf 0xB / 0x1F ECX level types.
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Adjusts KVM_GET_SUPPORTED_CPUID's `entries` for vCPU `vcpu_id` of `cpu_count`.
///
/// - leaf 1: initial APIC ID and logical processor count in EBX, HTT when more than one CPU,
///   the hypervisor bit in ECX;
/// - leaf 4: cores per package, and which caches are shared (L1/L2 per core, L3 by all);
/// - leaves 0xB and (if KVM reports it) 0x1F: an SMT level of one thread and a core level of
///   `cpu_count`, the x2APIC ID in EDX;
/// - everything else, including KVM's 0x4000_0000 paravirtual leaves, is kept as given.
///
/// APIC IDs equal vCPU indices, as in the MADT and MP table. Values too wide for their field are
/// clamped.
pub fn filter(entries: &mut Vec<CpuIdEntry>, vcpu_id: u32, cpu_count: u32) {
    let cpu_count = cpu_count.max(1);
    let max_basic = entries
        .iter()
        .find(|e| e.function == LEAF_MAX_BASIC)
        .map_or(0, |e| e.eax);

    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                let apic_id = vcpu_id.min(0xff);
                let logical = cpu_count.min(0xff);
                entry.ebx &= !(EBX_APIC_ID_MASK | EBX_LOGICAL_COUNT_MASK);
                entry.ebx |= (apic_id << EBX_APIC_ID_SHIFT) | (logical << EBX_LOGICAL_COUNT_SHIFT);
                entry.ecx |= ECX_HYPERVISOR;
                if cpu_count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if entry.eax & CACHE_TYPE_MASK != 0 => {
                let level = (entry.eax >> CACHE_LEVEL_SHIFT) & CACHE_LEVEL_MASK;
                let sharing = if level >= 3 { cpu_count - 1 } else { 0 };
                let cores = cpu_count.min(64) - 1;
                entry.eax &= !(CACHE_SHARING_MASK | CORES_PER_PACKAGE_MASK);
                entry.eax |= (sharing.min(0xfff) << CACHE_SHARING_SHIFT)
                    | (cores << CORES_PER_PACKAGE_SHIFT);
            }
            _ => {}
        }
    }

    if max_basic >= LEAF_EXT_TOPOLOGY {
        replace_topology_leaf(entries, LEAF_EXT_TOPOLOGY, vcpu_id, cpu_count);
    }
    if max_basic >= LEAF_V2_EXT_TOPOLOGY
        && entries.iter().any(|e| e.function == LEAF_V2_EXT_TOPOLOGY)
    {
        replace_topology_leaf(entries, LEAF_V2_EXT_TOPOLOGY, vcpu_id, cpu_count);
    }
}

/// Number of bits needed to give `count` things distinct IDs: ceil(log2(count)).
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// Replaces every sub-leaf of `function` with: 0 = SMT (1 thread), 1 = core (`cpu_count`
/// logical processors), 2 = end of the list.
fn replace_topology_leaf(
    entries: &mut Vec<CpuIdEntry>,
    function: u32,
    x2apic_id: u32,
    cpu_count: u32,
) {
    entries.retain(|e| e.function != function);
    let level = |index: u32, eax: u32, ebx: u32, level_type: u32| CpuIdEntry {
        function,
        index,
        flags: CPUID_FLAG_SIGNIFICANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: x2apic_id,
        ..Default::default()
    };
    entries.push(level(0, 0, 1, LEVEL_TYPE_SMT));
    entries.push(level(
        1,
        id_bits(cpu_count),
        cpu_count & 0xffff,
        LEVEL_TYPE_CORE,
    ));
    entries.push(level(2, 0, 0, LEVEL_TYPE_INVALID));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuIdEntry {
        CpuIdEntry {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// A host-like list: max leaf 0x1f, a 16-thread host's leaf 1 and caches, KVM leaves.
    fn synthetic() -> Vec<CpuIdEntry> {
        vec![
            entry(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(1, 0, 0x000906ea, 0x0510_0800, 0x7ffa_f3bf, 0xbfeb_fbff),
            // L1d, L1i, L2 shared by 2 threads; L3 shared by 16; 8 cores.
            entry(4, 0, 0x1c00_4121, 0x01c0_003f, 0x3f, 0),
            entry(4, 1, 0x1c00_4122, 0x01c0_003f, 0x3f, 0),
            entry(4, 2, 0x1c00_4143, 0x00c0_003f, 0x3ff, 0),
            entry(4, 3, 0x1c03_c163, 0x02c0_003f, 0x2fff, 6),
            entry(4, 4, 0, 0, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 5),
            entry(0xb, 1, 4, 16, 0x201, 5),
            entry(0x1f, 0, 1, 2, 0x100, 5),
            entry(0x1f, 1, 4, 16, 0x201, 5),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            entry(0x4000_0001, 0, 0x0100_7afb, 0, 0, 0),
        ]
    }

    fn find(entries: &[CpuIdEntry], function: u32, index: u32) -> CpuIdEntry {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn leaf1_apic_id_count_and_hypervisor_bit() {
        let mut entries = synthetic();
        filter(&mut entries, 3, 6);
        let e = find(&entries, 1, 0);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 6);
        assert_eq!(e.ebx & 0xffff, 0x0800, "CLFLUSH size and brand kept");
        assert_ne!(e.ecx & (1 << 31), 0);
        assert_ne!(e.edx & (1 << 28), 0);
        assert_eq!(e.eax, 0x000906ea);

        let mut entries = synthetic();
        filter(&mut entries, 0, 1);
        let e = find(&entries, 1, 0);
        assert_eq!(e.ebx >> 16, 0x0001);
        assert_eq!(e.edx & (1 << 28), 0, "no HTT with one CPU");
    }

    #[test]
    fn leaf4_cores_and_sharing() {
        let mut entries = synthetic();
        filter(&mut entries, 0, 4);
        for index in 0..3 {
            let e = find(&entries, 4, index);
            assert_eq!(e.eax >> 26, 3, "cores per package - 1");
            assert_eq!((e.eax >> 14) & 0xfff, 0, "L1/L2 per core");
            assert_eq!(e.eax & 0x3fff, synthetic()[2 + index as usize].eax & 0x3fff);
        }
        let l3 = find(&entries, 4, 3);
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3, "L3 shared by all 4");
        assert_eq!(find(&entries, 4, 4).eax, 0, "terminator untouched");
    }

    #[test]
    fn topology_leaves() {
        for function in [0xb, 0x1f] {
            let mut entries = synthetic();
            filter(&mut entries, 5, 6);
            assert_eq!(entries.iter().filter(|e| e.function == function).count(), 3);
            let smt = find(&entries, function, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
            assert_eq!(smt.flags, CPUID_FLAG_SIGNIFICANT_INDEX);
            let core = find(&entries, function, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
            let end = find(&entries, function, 2);
            assert_eq!((end.eax, end.ebx, end.ecx & 0xff00, end.edx), (0, 0, 0, 5));
            assert_eq!(end.ecx & 0xff, 2);
        }
    }

    #[test]
    fn leaf_1f_not_added_when_absent() {
        let mut entries: Vec<_> = synthetic()
            .into_iter()
            .filter(|e| e.function != 0x1f)
            .collect();
        filter(&mut entries, 0, 2);
        assert!(!entries.iter().any(|e| e.function == 0x1f));
        assert_eq!(find(&entries, 0xb, 1).ebx, 2);
    }

    #[test]
    fn topology_leaf_follows_the_max_basic_leaf() {
        // KVM did not list 0xB but the max leaf covers it: it is added.
        let mut entries = vec![entry(0, 0, 0xd, 0, 0, 0), entry(1, 0, 0, 0, 0, 0)];
        filter(&mut entries, 1, 2);
        assert_eq!(entries.iter().filter(|e| e.function == 0xb).count(), 3);
        // A max leaf below 0xB: nothing is added.
        let mut entries = vec![entry(0, 0, 0xa, 0, 0, 0)];
        filter(&mut entries, 1, 2);
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn kvm_leaves_are_kept() {
        let mut entries = synthetic();
        filter(&mut entries, 2, 4);
        assert_eq!(find(&entries, 0x4000_0000, 0), synthetic()[11]);
        assert_eq!(find(&entries, 0x4000_0001, 0), synthetic()[12]);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 255].map(id_bits),
            [0, 1, 2, 2, 3, 3, 4, 8]
        );
    }

    #[test]
    fn wide_values_are_clamped() {
        let mut entries = synthetic();
        filter(&mut entries, 300, 300);
        let e = find(&entries, 1, 0);
        assert_eq!(e.ebx >> 24, 0xff);
        assert_eq!((e.ebx >> 16) & 0xff, 0xff);
        assert_eq!(find(&entries, 4, 0).eax >> 26, 63);
        assert_eq!(find(&entries, 0xb, 0).edx, 300);
        filter(&mut entries, 0, 0);
        assert_eq!((find(&entries, 1, 0).ebx >> 16) & 0xff, 1);
    }
}
