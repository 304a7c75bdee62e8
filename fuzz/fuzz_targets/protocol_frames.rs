//! Arbitrary bytes from a peer (either side) through the framing and decoding of husk-proto:
//! every outcome must be a message or a `ProtoError`, never a panic, a hang or an allocation
//! beyond the frame limit. Run: `cargo +nightly fuzz run protocol_frames` in `fuzz/`.
#![no_main]

use husk_proto::{FrameDecoder, GuestMessage, HostMessage, decode, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a stream, split at an arbitrary point (partial reads).
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut dec = FrameDecoder::default();
    dec.push(&data[..split]);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = dec.next_frame() {
        frames.push(f);
    }
    dec.push(&data[split..]);
    while let Ok(Some(f)) = dec.next_frame() {
        frames.push(f);
    }
    // Every payload (and the raw input itself) decoded as either side's message; what
    // decodes must re-encode and decode to the same value.
    for payload in frames
        .iter()
        .map(Vec::as_slice)
        .chain(std::iter::once(data))
    {
        if let Ok(m) = decode::<HostMessage>(payload) {
            let again = encode_frame(&m).expect("a decoded message re-encodes");
            assert_eq!(decode::<HostMessage>(&again[4..]).ok(), Some(m));
        }
        if let Ok(m) = decode::<GuestMessage>(payload) {
            let again = encode_frame(&m).expect("a decoded message re-encodes");
            assert_eq!(decode::<GuestMessage>(&again[4..]).ok(), Some(m));
        }
    }
});
