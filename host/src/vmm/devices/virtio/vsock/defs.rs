//! virtio-vsock wire constants (virtio 1.1 §5.10) and the limits this device enforces.

use std::time::Duration;

use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type the device offers.
pub(super) const TYPE_STREAM: u16 = 1;

/// `VIRTIO_VSOCK_OP_*`.
pub(super) mod op {
    pub(in super::super) const REQUEST: u16 = 1;
    pub(in super::super) const RESPONSE: u16 = 2;
    pub(in super::super) const RST: u16 = 3;
    pub(in super::super) const SHUTDOWN: u16 = 4;
    pub(in super::super) const RW: u16 = 5;
    pub(in super::super) const CREDIT_UPDATE: u16 = 6;
    pub(in super::super) const CREDIT_REQUEST: u16 = 7;
}

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
pub(super) const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
pub(super) const SHUTDOWN_SEND: u32 = 2;
pub(super) const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Queue indices.
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
pub(super) const EVQ: usize = 2;
pub(super) const QUEUE_SIZE: u16 = 256;

/// Largest payload accepted in one TX packet or written into one RX buffer. Linux never sends
/// more than `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE` (64 KiB) per packet.
pub(super) const MAX_PKT_DATA: u32 = 64 * 1024;

/// Per-connection buffer for guest data the host socket could not take yet. Advertised to the
/// guest as `buf_alloc`, so a guest that respects credit can never overrun it.
pub(super) const CONN_BUF_SIZE: u32 = 256 * 1024;

/// Tell the guest how much we forwarded once the free space it believes we have drops below
/// this (it would otherwise stall waiting for credit).
pub(super) const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

/// Open connections per device; more are refused with RST.
pub(super) const MAX_CONNECTIONS: usize = 1024;
/// Host clients that connected but have not finished their `CONNECT <port>` line.
pub(super) const MAX_HANDSHAKES: usize = 64;
/// Longest `CONNECT <port>\n` line accepted.
pub(super) const MAX_CONNECT_LINE: usize = 32;
/// RSTs for packets that match no connection, waiting for RX buffers. While this many are
/// queued the device stops taking TX packets (the guest's own TX backs up) instead of growing.
pub(super) const MAX_PENDING_RST: usize = 256;

/// How long the guest has to answer a host-initiated REQUEST.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Host-initiated connections get local ports from here up, as in Firecracker, clear of the
/// ports services listen on.
pub(super) const LOCAL_PORT_FIRST: u32 = 1 << 30;

/// Bytes of an RX packet header in the guest buffer.
pub(super) const HDR_LEN: u32 = 44;
const _: () = assert!(PKT_HEADER_SIZE == HDR_LEN as usize);

/// The header of a packet the device sends to the guest (always from `HOST_CID`).
#[derive(Debug, Clone, Copy)]
pub(super) struct RxHeader {
    pub(super) guest_cid: u64,
    pub(super) host_port: u32,
    pub(super) guest_port: u32,
    pub(super) op: u16,
    pub(super) flags: u32,
    pub(super) len: u32,
    pub(super) buf_alloc: u32,
    pub(super) fwd_cnt: u32,
}

impl RxHeader {
    /// Writes the header into the RX packet's header buffer in guest memory.
    pub(super) fn write(&self, pkt: &mut VsockPacket<'_, ()>) {
        let mut raw = [0u8; PKT_HEADER_SIZE];
        let host_cid = u64::from(husk_proto::HOST_CID);
        raw[0..8].copy_from_slice(&host_cid.to_le_bytes());
        raw[8..16].copy_from_slice(&self.guest_cid.to_le_bytes());
        raw[16..20].copy_from_slice(&self.host_port.to_le_bytes());
        raw[20..24].copy_from_slice(&self.guest_port.to_le_bytes());
        raw[24..28].copy_from_slice(&self.len.to_le_bytes());
        raw[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        raw[30..32].copy_from_slice(&self.op.to_le_bytes());
        raw[32..36].copy_from_slice(&self.flags.to_le_bytes());
        raw[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        raw[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        // The header slice is exactly PKT_HEADER_SIZE bytes of validated guest memory, so this
        // cannot fail; log rather than panic all the same.
        if let Err(e) = pkt.set_header_from_raw(&raw) {
            eprintln!("virtio-vsock: cannot write an RX header: {e}");
        }
    }
}

/// The fields of a packet the guest sent that the device acts on.
#[derive(Debug, Clone, Copy)]
pub(super) struct TxHeader {
    pub(super) src_cid: u64,
    pub(super) dst_cid: u64,
    pub(super) src_port: u32,
    pub(super) dst_port: u32,
    pub(super) type_: u16,
    pub(super) op: u16,
    pub(super) flags: u32,
    pub(super) buf_alloc: u32,
    pub(super) fwd_cnt: u32,
}

impl TxHeader {
    pub(super) fn of(pkt: &VsockPacket<'_, ()>) -> Self {
        Self {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }
}
