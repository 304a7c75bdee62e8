//! What a frame may be: how long, and what its virtio-net header may ask for under the
//! features the driver negotiated, both ways (the tap takes and gives the same header). The
//! offloads offered and the tap's offloads are derived here too, so that what is offered,
//! what the tap is told and what is checked cannot drift apart.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};

use super::tap::VNET_HDR_LEN;

/// The longest frame either way, header included: 12 bytes of header and 65550 of frame
/// (a 64 KiB IP packet, an Ethernet header and a VLAN tag), as Firecracker allows.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65_550;

/// Bytes of an Ethernet header: the shortest frame worth passing on.
const ETH_HLEN: usize = 14;

/// Feature bits as masks.
pub(super) const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// The offloads the device offers: checksums and TCP segmentation both ways.
pub(super) const OFFLOAD_FEATURES: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6);

/// A header flag or GSO type as the `u8` the header carries (all are below 256).
pub(super) const fn as_flag(value: u32) -> u8 {
    (value & 0xff) as u8
}

/// The tap offloads (`TUN_F_*`) that match the driver's receive features.
pub(super) fn tap_offloads(features: u64) -> libc::c_uint {
    let mut flags = 0;
    if features & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
        flags |= libc::TUN_F_CSUM;
        // The kernel refuses TSO without CSUM.
        if features & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if features & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

/// Whether a header's `flags` and `gso_type` ask only for what `csum`, `tso4` and `tso6`
/// (features) allow.
pub(super) fn header_allowed(frame: &[u8], features: u64, csum: u32, tso4: u32, tso6: u32) -> bool {
    let (flags, gso) = (frame[0], frame[1]);
    let csum_ok = features & bit(csum) != 0;
    let known = as_flag(VIRTIO_NET_HDR_F_NEEDS_CSUM) | as_flag(VIRTIO_NET_HDR_F_DATA_VALID);
    if flags & !known != 0 || (flags & as_flag(VIRTIO_NET_HDR_F_NEEDS_CSUM) != 0 && !csum_ok) {
        return false;
    }
    match u32::from(gso) {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => csum_ok && features & bit(tso4) != 0,
        VIRTIO_NET_HDR_GSO_TCPV6 => csum_ok && features & bit(tso6) != 0,
        // UDP, ECN: never offered.
        _ => false,
    }
}

/// Why a guest frame (header included) cannot go to the tap, if it cannot.
pub(super) fn tx_frame_problem(frame: &[u8], features: u64) -> Option<&'static str> {
    if frame.len() < VNET_HDR_LEN + ETH_HLEN {
        return Some("shorter than an Ethernet header");
    }
    let allowed = header_allowed(
        frame,
        features,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
    );
    (!allowed).then_some("its header asks for offloads that were not negotiated")
}

/// Why a tap frame (header included) cannot go to the guest, if it cannot.
pub(super) fn rx_frame_problem(frame: &[u8], features: u64) -> Option<&'static str> {
    if frame.len() < VNET_HDR_LEN + ETH_HLEN {
        return Some("shorter than an Ethernet header");
    }
    // The tap's offloads follow the negotiated features, so this only happens to frames it
    // queued before a driver reset renegotiated less.
    let allowed = header_allowed(
        frame,
        features,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
    );
    (!allowed).then_some("it needs an offload the driver did not negotiate")
}
