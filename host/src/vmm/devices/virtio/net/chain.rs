//! Copying frames between the guest's descriptor chains and the device's host buffers, and
//! telling a chain the device cannot use ([`Malformed`]: the driver broke the protocol, the
//! device stops) from a frame it merely drops.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::frame::MAX_FRAME_LEN;
use super::tap::VNET_HDR_LEN;

/// A chain the device cannot use: the device breaks.
#[derive(Debug)]
pub(super) struct Malformed(pub(super) String);

/// Copies a TX chain (header and frame) into `buf`; returns its length.
pub(super) fn read_tx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<usize, Malformed> {
    let head = chain.head_index();
    let mut len = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err(Malformed(format!(
                "TX chain {head} has a device-writable buffer"
            )));
        }
        let dlen = usize::try_from(desc.len()).unwrap_or(usize::MAX);
        let end = len
            .checked_add(dlen)
            .filter(|&end| end <= buf.len())
            .ok_or_else(|| {
                Malformed(format!(
                    "TX chain {head} is longer than {MAX_FRAME_LEN} bytes"
                ))
            })?;
        mem.read_slice(&mut buf[len..end], desc.addr())
            .map_err(|e| Malformed(format!("TX chain {head}: {e}")))?;
        len = end;
    }
    if len < VNET_HDR_LEN {
        return Err(Malformed(format!(
            "TX chain {head} holds {len} bytes, less than a virtio-net header"
        )));
    }
    Ok(len)
}

/// Copies `frame` into an RX chain; `None` if the chain is too small for it.
pub(super) fn write_rx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> Result<Option<u32>, Malformed> {
    let head = chain.head_index();
    let descs: Vec<_> = chain.collect();
    let mut capacity = 0usize;
    for desc in &descs {
        if !desc.is_write_only() {
            return Err(Malformed(format!(
                "RX chain {head} has a device-readable buffer"
            )));
        }
        capacity = capacity.saturating_add(usize::try_from(desc.len()).unwrap_or(usize::MAX));
    }
    if capacity < VNET_HDR_LEN {
        return Err(Malformed(format!(
            "RX chain {head} has room for {capacity} bytes, less than a virtio-net header"
        )));
    }
    if frame.len() > capacity {
        return Ok(None);
    }
    let mut rest = frame;
    for desc in &descs {
        if rest.is_empty() {
            break;
        }
        let n = rest
            .len()
            .min(usize::try_from(desc.len()).unwrap_or(usize::MAX));
        mem.write_slice(&rest[..n], desc.addr())
            .map_err(|e| Malformed(format!("RX chain {head}: {e}")))?;
        rest = &rest[n..];
    }
    Ok(Some(u32::try_from(frame.len()).unwrap_or(u32::MAX)))
}
