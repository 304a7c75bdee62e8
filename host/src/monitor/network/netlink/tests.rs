use super::*;

#[test]
fn attributes_round_trip_with_padding() {
    let mut buf = Vec::new();
    push_attr(&mut buf, 3, b"eth0\0");
    push_attr(&mut buf, 4, &1500u32.to_ne_bytes());
    assert_eq!(buf.len(), 8 + 12 - 4 + 4);
    let got: Vec<_> = attrs(&buf).collect();
    assert_eq!(got.len(), 2);
    assert_eq!(c_string(got[0].1), "eth0");
    assert_eq!(read_u32(got[1].1), Some(1500));
}

#[test]
fn nested_attributes_carry_their_length_and_flag() {
    let mut buf = Vec::new();
    let at = nest_start(&mut buf, TCA_OPTIONS);
    push_attr(&mut buf, TCA_KIND, b"u32\0");
    nest_end(&mut buf, at);
    let (typ, inner) = attrs(&buf).next().unwrap();
    assert_eq!(typ, TCA_OPTIONS);
    assert_eq!(
        u16::from_ne_bytes([buf[2], buf[3]]) & NLA_F_NESTED,
        NLA_F_NESTED
    );
    assert_eq!(
        attrs(inner).next().map(|(_, d)| c_string(d)),
        Some("u32".into())
    );
}

#[test]
fn malformed_attributes_end_the_walk() {
    // Claims 200 bytes in an 8-byte buffer.
    let buf = [200u8, 0, 1, 0, 0, 0, 0, 0];
    assert_eq!(attrs(&buf).count(), 0);
    assert_eq!(attrs(&[1u8, 2]).count(), 0);
}

#[test]
fn addresses_parse_by_family() {
    assert_eq!(
        ip(AF_INET, &[10, 0, 0, 2]),
        Some("10.0.0.2".parse().unwrap())
    );
    assert_eq!(ip(AF_INET, &[10, 0]), None);
    assert_eq!(ip(99, &[10, 0, 0, 2]), None);
}
