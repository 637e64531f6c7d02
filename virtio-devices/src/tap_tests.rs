use super::*;
use crate::test_netns::{in_private_netns, test_frame, PacketSocket};

#[test]
fn invalid_names_and_queue_counts_are_refused_before_touching_the_kernel() {
    for name in ["", "sixteen-chars-xx", "a/b", "a:b", "a b", ".", ".."] {
        let err = Tap::open(Some(name)).unwrap_err();
        assert!(matches!(err, TapError::InvalidName(_)), "{name:?}: {err}");
        assert!(err.to_string().contains("1 to 15 bytes"), "{err}");
    }
    assert!(matches!(
        Tap::open_queues(Some("ok"), 0),
        Err(TapError::QueueCount(0))
    ));
    assert!(matches!(
        Tap::open_queues(Some("ok"), MAX_TAP_QUEUES + 1),
        Err(TapError::QueueCount(_))
    ));
}

#[test]
fn offload_flags_follow_the_kernel_rules() {
    assert_eq!(TapOffloads::default().flags(), 0);
    // Nothing without checksum offload.
    let no_csum = TapOffloads {
        csum: false,
        ..TapOffloads::ALL
    };
    assert_eq!(no_csum.flags(), 0);
    // ECN only with TSO.
    let ecn_alone = TapOffloads {
        csum: true,
        tso_ecn: true,
        ..TapOffloads::default()
    };
    assert_eq!(ecn_alone.flags(), libc::TUN_F_CSUM);
    assert_eq!(
        TapOffloads::ALL.flags(),
        libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO6
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_UFO
    );
}

#[test]
fn a_created_tap_exists_while_open_and_disappears_when_dropped() {
    in_private_netns("tap created", || {
        let tap = Tap::open(None).unwrap();
        assert!(tap.if_name().starts_with("tap"), "{}", tap.if_name());
        assert!(tap.created());
        assert!(!tap.is_multi_queue());
        let name = tap.if_name().to_string();
        assert!(if_index(&name).is_some());
        drop(tap);
        assert!(if_index(&name).is_none(), "{name} outlived its last queue");

        let named = Tap::open(Some("atrium-t0")).unwrap();
        assert_eq!(named.if_name(), "atrium-t0");
        assert!(named.created());
        drop(named);
        assert!(if_index("atrium-t0").is_none());
    });
}

/// Creates a persistent tap the way `ip tuntap add` does and closes it.
fn make_persistent_tap(name: &str, multi_queue: bool) {
    let file = open_tun().unwrap();
    let mut req = ifreq(name);
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq, which is exclusively borrowed for the call.
    let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req) };
    assert_eq!(ret, 0);
    // SAFETY: TUNSETPERSIST takes its argument by value.
    let ret = unsafe { ioctl_with_val(&file, libc::TUNSETPERSIST, 1) };
    assert_eq!(ret, 0);
}

#[test]
fn an_existing_persistent_tap_is_attached_and_left_in_place() {
    in_private_netns("tap persistent", || {
        make_persistent_tap("atrium-p0", false);
        let tap = Tap::open(Some("atrium-p0")).unwrap();
        assert!(!tap.created());
        drop(tap);
        assert!(if_index("atrium-p0").is_some());
        // The namespace takes the persistent tap with it when the test thread ends.
    });
}

#[test]
fn mismatched_and_busy_interfaces_are_explained() {
    in_private_netns("tap errors", || {
        let err = Tap::open(Some("lo")).unwrap_err();
        assert!(err.to_string().contains("not a single-queue tap"), "{err}");
        make_persistent_tap("atrium-p1", false);
        let err = Tap::open_queues(Some("atrium-p1"), 2).unwrap_err();
        assert!(err.to_string().contains("not a multi-queue tap"), "{err}");
        let held = Tap::open(Some("atrium-p1")).unwrap();
        let err = Tap::open(Some("atrium-p1")).unwrap_err();
        assert!(err.to_string().contains("another process"), "{err}");
        drop(held);
    });
}

#[test]
fn queues_of_a_multi_queue_tap_share_the_name_and_can_leave_and_rejoin() {
    in_private_netns("tap multi-queue", || {
        let queues = Tap::open_queues(None, 3).unwrap();
        assert_eq!(queues.len(), 3);
        let name = queues[0].if_name().to_string();
        for queue in &queues {
            assert_eq!(queue.if_name(), name);
            assert!(queue.is_multi_queue());
            assert!(queue.created());
            assert!(queue.is_queue_enabled());
        }
        queues[2].set_queue_enabled(false).unwrap();
        assert!(!queues[2].is_queue_enabled());
        // Idempotent both ways.
        queues[2].set_queue_enabled(false).unwrap();
        queues[2].set_queue_enabled(true).unwrap();
        queues[2].set_queue_enabled(true).unwrap();
        assert!(queues[2].is_queue_enabled());
        // A single-queue tap cannot leave.
        let single = Tap::open(None).unwrap();
        assert!(single.set_queue_enabled(false).is_err());
        single.set_queue_enabled(true).unwrap();
        drop(queues);
        assert!(if_index(&name).is_none());
    });
}

#[test]
fn the_link_comes_up_and_offloads_are_probed() {
    in_private_netns("tap link", || {
        let tap = Tap::open(None).unwrap();
        assert!(!tap.is_up().unwrap());
        tap.set_up().unwrap();
        assert!(tap.is_up().unwrap());
        let offloads = tap.supported_offloads();
        assert!(
            offloads.csum && offloads.tso4 && offloads.tso6,
            "{offloads:?}"
        );
        tap.set_offloads(offloads).unwrap();
        tap.set_offloads(TapOffloads::default()).unwrap();
    });
}

#[test]
fn frames_cross_the_tap_in_both_directions_with_a_virtio_net_header() {
    in_private_netns("tap frames", || {
        let tap = Tap::open(None).unwrap();
        tap.set_up().unwrap();
        let socket = PacketSocket::bind(tap.if_name());
        let mut buf = vec![0u8; 2048];
        assert_eq!(
            tap.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );

        // Written into the tap: arrives on the interface.
        let frame = test_frame([0xff; 6], [0x52, 0x54, 0, 0, 0, 1], b"to the host");
        let mut packet = vec![0u8; VNET_HDR_LEN];
        packet.extend_from_slice(&frame);
        assert_eq!(tap.write(&packet).unwrap(), packet.len());
        assert_eq!(socket.recv_test_frame(), frame);

        // Sent on the interface: read from the tap behind a header with no offload.
        let frame = test_frame(
            [0x52, 0x54, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            b"to the guest",
        );
        socket.send(&frame);
        let len = tap.read(&mut buf).unwrap();
        assert_eq!(&buf[VNET_HDR_LEN..len], &frame[..]);
        assert_eq!(buf[1], 0, "gso_type is NONE");
        assert_eq!(buf[0] & 1, 0, "no NEEDS_CSUM without offloads");
    });
}
