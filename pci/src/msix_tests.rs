use std::sync::Mutex;

use super::*;
use crate::configuration::{PciClassCode, PciConfiguration, PciHeader};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Deliver(u16, u64, u32),
    Route(u16, u64, u32, bool),
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
    fail_delivery: Mutex<bool>,
}

impl Recorder {
    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
    fn deliveries(&self) -> Vec<Event> {
        self.take()
            .into_iter()
            .filter(|event| matches!(event, Event::Deliver(..)))
            .collect()
    }
}

impl MsiDelivery for Recorder {
    fn deliver(&self, vector: u16, address: u64, data: u32) -> std::io::Result<()> {
        if *self.fail_delivery.lock().unwrap() {
            return Err(std::io::Error::other("no route"));
        }
        self.events
            .lock()
            .unwrap()
            .push(Event::Deliver(vector, address, data));
        Ok(())
    }
    fn update_route(
        &self,
        vector: u16,
        address: u64,
        data: u32,
        masked: bool,
    ) -> std::io::Result<()> {
        self.events
            .lock()
            .unwrap()
            .push(Event::Route(vector, address, data, masked));
        Ok(())
    }
}

fn msix(vectors: u16) -> (MsixConfig, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    (
        MsixConfig::new(vectors, recorder.clone()).unwrap(),
        recorder,
    )
}

fn write32(msix: &mut MsixConfig, offset: u64, value: u32) {
    msix.write_table(offset, &value.to_le_bytes());
}

fn read32(msix: &MsixConfig, offset: u64) -> u32 {
    let mut data = [0; 4];
    msix.read_table(offset, &mut data);
    u32::from_le_bytes(data)
}

fn program(msix: &mut MsixConfig, vector: u64, address: u64, data: u32) {
    let base = vector * MSIX_TABLE_ENTRY_SIZE;
    msix.write_table(base, &address.to_le_bytes());
    write32(msix, base + 8, data);
}

#[test]
fn capability_bytes_and_writable_bits() {
    let cap = MsixCapability::new(64, 1, 0x2000, 1, 0x3000).unwrap();
    assert_eq!(cap.id(), PciCapabilityId::MSIX);
    assert_eq!(
        cap.body(),
        vec![0x3f, 0x00, 0x01, 0x20, 0x00, 0x00, 0x01, 0x30, 0x00, 0x00]
    );
    assert_eq!(cap.writable_bits(), vec![0x00, 0xc0]);
    assert_eq!(
        (cap.table_size(), cap.table_bir(), cap.table_offset()),
        (64, 1, 0x2000)
    );
    assert_eq!((cap.pba_bir(), cap.pba_offset()), (1, 0x3000));
    assert_eq!(split_bir_offset(0x3001), (1, 0x3000));

    // Linked into a configuration space, only the enable and mask bits change.
    let mut config = PciConfiguration::new(&PciHeader {
        vendor_id: 0x1af4,
        device_id: 0x1041,
        revision_id: 1,
        class_code: PciClassCode::OTHER,
        subsystem_vendor_id: 0,
        subsystem_id: 0,
        multi_function: false,
        interrupt_pin: None,
    })
    .unwrap();
    let offset = config.add_capability(&cap).unwrap();
    let reg = offset / 4;
    assert_eq!(config.read_reg(reg), 0x003f_0011);
    config.write_config_register(reg, 0, &u32::MAX.to_le_bytes());
    assert_eq!(config.read_reg(reg), 0xc03f_0011);
    config.write_config_register(reg + 1, 0, &0u32.to_le_bytes());
    assert_eq!(config.read_reg(reg + 1), 0x2001);
    let (recorder_msix, _recorder) = msix(64);
    let mut msix = recorder_msix;
    msix.set_message_control((config.read_reg(reg) >> 16) as u16);
    assert!(msix.enabled() && msix.function_masked());
}

#[test]
fn capability_validation() {
    assert!(matches!(
        MsixCapability::new(0, 0, 0, 0, 0),
        Err(MsixError::InvalidVectorCount(0))
    ));
    assert!(matches!(
        MsixCapability::new(2049, 0, 0, 0, 0),
        Err(MsixError::InvalidVectorCount(2049))
    ));
    assert!(MsixCapability::new(2048, 5, 0, 5, 0x8000).is_ok());
    assert!(matches!(
        MsixCapability::new(1, 6, 0, 0, 0),
        Err(MsixError::InvalidBir(6))
    ));
    assert!(matches!(
        MsixCapability::new(1, 0, 0, 7, 0),
        Err(MsixError::InvalidBir(7))
    ));
    assert!(matches!(
        MsixCapability::new(1, 0, 4, 0, 0),
        Err(MsixError::MisalignedOffset(4))
    ));
    assert_eq!(
        MsixCapability::new(2048, 0, 0, 0, 0).unwrap().body()[..2],
        [0xff, 0x07]
    );
}

#[test]
fn table_size_validation() {
    let recorder: Arc<dyn MsiDelivery> = Arc::new(Recorder::default());
    assert!(matches!(
        MsixConfig::new(0, recorder.clone()),
        Err(MsixError::InvalidVectorCount(0))
    ));
    assert!(matches!(
        MsixConfig::new(2049, recorder.clone()),
        Err(MsixError::InvalidVectorCount(2049))
    ));
    let msix = MsixConfig::new(2048, recorder.clone()).unwrap();
    assert_eq!(msix.table_size_bytes(), 2048 * 16);
    assert_eq!(msix.pba_size_bytes(), 256);
    let msix = MsixConfig::new(65, recorder).unwrap();
    assert_eq!(msix.pba_size_bytes(), 16);
}

#[test]
fn table_reset_state_and_programming() {
    let (mut msix, _) = msix(4);
    // Every vector starts masked with an empty message.
    for vector in 0..4 {
        assert_eq!(read32(&msix, vector * 16 + 12), 1);
        assert_eq!(read32(&msix, vector * 16), 0);
    }
    program(&mut msix, 2, 0x1_fee0_0000, 0x4041);
    assert_eq!(read32(&msix, 0x20), 0xfee0_0000);
    assert_eq!(read32(&msix, 0x24), 0x1);
    assert_eq!(read32(&msix, 0x28), 0x4041);
    let mut qword = [0; 8];
    msix.read_table(0x20, &mut qword);
    assert_eq!(u64::from_le_bytes(qword), 0x1_fee0_0000);
    msix.read_table(0x28, &mut qword);
    assert_eq!(u64::from_le_bytes(qword), 0x1_0000_4041);
    // Reserved bits: address bits 1:0 and vector control bits 31:1 read as zero.
    write32(&mut msix, 0x30, 0xfee0_0003);
    write32(&mut msix, 0x3c, 0xffff_fffe);
    assert_eq!(read32(&msix, 0x30), 0xfee0_0000);
    assert_eq!(read32(&msix, 0x3c), 0);
    let entry = msix.entry(3).unwrap();
    assert_eq!((entry.address(), entry.masked()), (0xfee0_0000, false));
    assert!(msix.entry(4).is_none());
}

#[test]
fn invalid_table_accesses() {
    let (mut msix, recorder) = msix(2);
    let before = msix.state();
    for (offset, len) in [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (4, 8),
        (2, 4),
        (0, 16),
        (0x20, 4),
        (u64::MAX - 3, 4),
    ] {
        let data = vec![0xab; len];
        msix.write_table(offset, &data);
        let mut out = vec![0; len];
        msix.read_table(offset, &mut out);
        assert!(
            out.iter().all(|&byte| byte == 0xff),
            "read {offset:#x}/{len}"
        );
        msix.write_pba(offset, &data);
        msix.read_pba(offset, &mut out);
        assert!(
            out.iter().all(|&byte| byte == 0xff),
            "pba read {offset:#x}/{len}"
        );
    }
    assert_eq!(msix.state(), before);
    assert!(recorder.take().is_empty());
}

#[test]
fn fired_while_disabled_is_dropped() {
    let (mut msix, recorder) = msix(2);
    program(&mut msix, 0, 0xfee0_0000, 0x30);
    write32(&mut msix, 12, 0);
    assert_eq!(msix.trigger(0).unwrap(), MsixTrigger::Disabled);
    assert!(!msix.is_pending(0));
    assert!(recorder.take().is_empty());
    assert!(matches!(
        msix.trigger(2),
        Err(MsixError::VectorOutOfRange {
            vector: 2,
            count: 2
        })
    ));
}

#[test]
fn enable_installs_routes_and_unmasked_vector_delivers() {
    let (mut msix, recorder) = msix(2);
    program(&mut msix, 0, 0xfee0_0000, 0x30);
    write32(&mut msix, 12, 0);
    // Table writes while disabled do not touch routes.
    assert!(recorder.take().is_empty());
    msix.set_message_control(MSIX_ENABLE);
    assert_eq!(
        recorder.take(),
        vec![
            Event::Route(0, 0xfee0_0000, 0x30, false),
            Event::Route(1, 0, 0, true)
        ]
    );
    assert_eq!(msix.trigger(0).unwrap(), MsixTrigger::Delivered);
    assert_eq!(recorder.take(), vec![Event::Deliver(0, 0xfee0_0000, 0x30)]);
    // Reprogramming an entry while enabled updates its route.
    write32(&mut msix, 8, 0x31);
    assert_eq!(
        recorder.take(),
        vec![Event::Route(0, 0xfee0_0000, 0x31, false)]
    );
    // Rewriting the same value changes nothing.
    write32(&mut msix, 8, 0x31);
    assert!(recorder.take().is_empty());
    // Disabling masks every route.
    msix.set_message_control(0);
    assert_eq!(
        recorder.take(),
        vec![
            Event::Route(0, 0xfee0_0000, 0x31, true),
            Event::Route(1, 0, 0, true)
        ]
    );
}

#[test]
fn vector_mask_holds_pending_until_unmask() {
    let (mut msix, recorder) = msix(70);
    msix.set_message_control(MSIX_ENABLE);
    program(&mut msix, 65, 0xfee0_1000, 0x41);
    recorder.take();
    assert_eq!(msix.trigger(65).unwrap(), MsixTrigger::Pending);
    assert_eq!(msix.trigger(65).unwrap(), MsixTrigger::Pending);
    assert!(msix.is_pending(65));
    let mut pba = [0; 8];
    msix.read_pba(8, &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 1 << 1);
    let mut pba = [0; 4];
    msix.read_pba(8, &mut pba);
    assert_eq!(u32::from_le_bytes(pba), 1 << 1);
    msix.read_pba(12, &mut pba);
    assert_eq!(u32::from_le_bytes(pba), 0);
    // The PBA is read-only.
    msix.write_pba(8, &[0; 8]);
    assert!(msix.is_pending(65));
    assert!(recorder.take().is_empty());
    // Unmasking delivers once and clears the bit.
    write32(&mut msix, 65 * 16 + 12, 0);
    assert_eq!(
        recorder.take(),
        vec![
            Event::Route(65, 0xfee0_1000, 0x41, false),
            Event::Deliver(65, 0xfee0_1000, 0x41)
        ]
    );
    assert!(!msix.is_pending(65));
    assert_eq!(msix.trigger(65).unwrap(), MsixTrigger::Delivered);
}

#[test]
fn function_mask_holds_all_vectors() {
    let (mut msix, recorder) = msix(3);
    for vector in 0..3 {
        program(&mut msix, vector, 0xfee0_0000, 0x20 + vector as u32);
        write32(&mut msix, vector * 16 + 12, 0);
    }
    msix.set_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
    assert!(recorder
        .take()
        .iter()
        .all(|event| matches!(event, Event::Route(_, _, _, true))));
    assert_eq!(msix.trigger(0).unwrap(), MsixTrigger::Pending);
    assert_eq!(msix.trigger(2).unwrap(), MsixTrigger::Pending);
    // Unmasking a vector under the function mask delivers nothing yet.
    write32(&mut msix, 12, 1);
    write32(&mut msix, 12, 0);
    assert!(recorder.deliveries().is_empty());
    msix.set_message_control(MSIX_ENABLE);
    assert_eq!(
        recorder.deliveries(),
        vec![
            Event::Deliver(0, 0xfee0_0000, 0x20),
            Event::Deliver(2, 0xfee0_0000, 0x22)
        ]
    );
    assert!(!msix.is_pending(0) && !msix.is_pending(2));
}

#[test]
fn pending_survives_disable_and_failed_delivery() {
    let (mut msix, recorder) = msix(1);
    program(&mut msix, 0, 0xfee0_0000, 0x50);
    msix.set_message_control(MSIX_ENABLE);
    assert_eq!(msix.trigger(0).unwrap(), MsixTrigger::Pending);
    *recorder.fail_delivery.lock().unwrap() = true;
    write32(&mut msix, 12, 0);
    assert!(msix.is_pending(0), "a failed delivery keeps the bit");
    assert!(matches!(
        msix.trigger(0),
        Err(MsixError::Delivery { vector: 0, .. })
    ));
    *recorder.fail_delivery.lock().unwrap() = false;
    // Mask, unmask: the pending vector goes out now.
    write32(&mut msix, 12, 1);
    recorder.take();
    write32(&mut msix, 12, 0);
    assert_eq!(
        recorder.deliveries(),
        vec![Event::Deliver(0, 0xfee0_0000, 0x50)]
    );
    assert!(!msix.is_pending(0));
}

#[test]
fn state_round_trip_reinstalls_routes() {
    let (mut msix, _) = msix(66);
    program(&mut msix, 1, 0xfee0_2000, 0x61);
    msix.set_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
    msix.trigger(1).unwrap();
    let json = serde_json::to_string(&msix.state()).unwrap();
    let state: MsixConfigState = serde_json::from_str(&json).unwrap();
    let recorder = Arc::new(Recorder::default());
    let mut restored = MsixConfig::from_state(&state, recorder.clone()).unwrap();
    assert_eq!(restored.state(), msix.state());
    assert_eq!(recorder.take().len(), 66);
    write32(&mut restored, 16 + 12, 0);
    restored.set_message_control(MSIX_ENABLE);
    assert_eq!(
        recorder.deliveries(),
        vec![Event::Deliver(1, 0xfee0_2000, 0x61)]
    );
}

#[test]
fn invalid_states_are_rejected() {
    let (msix, recorder) = msix(3);
    let good = msix.state();
    let mut state = good.clone();
    state.table.clear();
    assert!(MsixConfig::from_state(&state, recorder.clone()).is_err());
    let mut state = good.clone();
    state.pba.push(0);
    assert!(MsixConfig::from_state(&state, recorder.clone()).is_err());
    let mut state = good.clone();
    state.pba[0] = 1 << 3;
    assert!(MsixConfig::from_state(&state, recorder.clone()).is_err());
    let mut state = good.clone();
    state.table = vec![MsixTableEntry::default(); 2049];
    state.pba = vec![0; 33];
    assert!(MsixConfig::from_state(&state, recorder.clone()).is_err());
    // Reserved bits in a saved entry are cleared on restore.
    let mut state = good;
    state.table[0].vector_ctl = 0xffff_fffe;
    state.table[0].msg_addr_lo = 0xfee0_0003;
    let restored = MsixConfig::from_state(&state, recorder).unwrap();
    assert_eq!(restored.entry(0).unwrap().vector_ctl, 0);
    assert_eq!(restored.entry(0).unwrap().msg_addr_lo, 0xfee0_0000);
}
