//! Property checks on arbitrary input, shared by the fuzz targets in `fuzz/` and by
//! `cargo test`, which replays their committed corpus (`tests/fuzz_corpus.rs`).
//!
//! Every function here accepts any input and panics only when a property of the codec is
//! violated: a panic is a bug, either in the codec or in the property. Besides "no input makes
//! the codec panic" (the panic contract of [`wire`](crate::wire) and [`stun`](crate::stun)),
//! they check that decoding and encoding agree and that the state machines keep their
//! invariants.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use arbitrary::{Result as ArbitraryResult, Unstructured};

use crate::stun::{
    answer_binding_request, decode_binding_response, is_stun, NatDiscovery, NatDiscoveryConfig,
    NatEvent, StunError, TransactionId,
};
use crate::wire::{
    verify_envelope_integrity, Candidate, CandidateKind, Capabilities, ConnectionInfo,
    DecodeErrorKind, DeframeError, Envelope, EnvelopeError, EnvelopeType, Header, InnerPacket,
    InternalAddress, Message, MessageType, PeerCredentials, PeerServiceResult, ResultCode,
    ServiceAction, ServiceType, StreamDeframer, Transport, ENVELOPE_HEADER_LEN, MAX_BUFFERED,
    MAX_CANDIDATES, MAX_CONTROL_LEN, MAX_DNS_SERVERS, MAX_ENVELOPE_LEN, VERSION,
};

/// Key for the integrity round trip; any fixed value does.
const INTEGRITY_KEY: [u8; 16] = *b"fuzzing-peer-key";

/// Properties of the control message codec. `data` is a control message without its envelope
/// (the payload of a control envelope).
///
/// - If [`Message::decode`] accepts `data`, the message encodes, in no more octets than `data`
///   (so within [`MAX_CONTROL_LEN`]) and in exactly [`Message::encoded_len`] octets, and the
///   encoding decodes to an equal message: decode → encode → decode is the identity. The
///   encoding is canonical (encoding the re-decoded message gives the same octets), and inside
///   a control envelope it is the payload of a valid datagram envelope. Signed with a key, it
///   verifies with that key and not with another.
/// - If decoding fails, the error response the receiver rules require (if any) encodes, and
///   decodes back to itself, unless its type is unknown to this version (the answer to an
///   unknown request), which decodes as exactly that error.
/// - [`Envelope::decode_datagram`], [`InnerPacket::parse`] and [`Message::verify_integrity`]
///   accept `data` without panicking, and what they accept is consistent with it.
pub fn control_message(data: &[u8]) {
    match Message::decode(data) {
        Ok(message) => control_round_trip(data, &message),
        Err(err) => {
            if let Some(reply) = err.response() {
                assert!(
                    !reply.header.message_type.is_request(),
                    "error reply {reply:?} is a request"
                );
                let encoded = encode(&reply);
                match Message::decode(&encoded) {
                    Ok(decoded) => assert_eq!(decoded, reply, "error reply does not round-trip"),
                    Err(e) => assert_eq!(
                        e.kind,
                        DecodeErrorKind::UnknownMessage(reply.header.message_type),
                        "error reply {reply:?} does not decode"
                    ),
                }
            }
        }
    }

    if let Ok(envelope) = Envelope::decode_datagram(data) {
        let mut again = Vec::new();
        // The length field was a u16 equal to data.len(), so the payload fits.
        Envelope::encode(envelope.kind, envelope.payload, &mut again)
            .expect("a decoded envelope re-encodes");
        assert_eq!(again, data, "envelope does not round-trip");
    }
    if let Ok(packet) = InnerPacket::parse(data) {
        assert_eq!(packet.as_bytes(), data);
        let source_family = packet.source().is_ipv4();
        assert_eq!(source_family, packet.destination().is_ipv4());
        assert_eq!(source_family, data[0] >> 4 == 4);
        let _ = packet.udp_ports();
    }
    let _ = Message::verify_integrity(data, &[0; 16]);
    let _ = verify_envelope_integrity(data, &[0; 16]);
}

/// Checks the round trip of a message decoded from `data`.
fn control_round_trip(data: &[u8], message: &Message<'_>) {
    let encoded = encode(message);
    assert!(
        encoded.len() <= data.len() && encoded.len() <= MAX_CONTROL_LEN,
        "re-encoding grew from {} to {} octets",
        data.len(),
        encoded.len()
    );
    assert_eq!(encoded.len(), message.encoded_len());
    let decoded = Message::decode(&encoded).expect("a re-encoded message decodes");
    assert_eq!(
        &decoded, message,
        "decode → encode → decode changed the message"
    );
    assert_eq!(encode(&decoded), encoded, "the encoding is not canonical");

    let mut enveloped = Vec::new();
    message
        .encode_envelope(&mut enveloped)
        .expect("a message that encodes fits an envelope");
    let envelope = Envelope::decode_datagram(&enveloped).expect("a valid envelope");
    assert_eq!(envelope.kind, EnvelopeType::CONTROL);
    assert_eq!(envelope.payload, encoded);

    let mut signed = Vec::new();
    // Adding the integrity TLV can push the message over the size limit; that is an error,
    // not a property violation.
    if message
        .encode_envelope_with_integrity(&INTEGRITY_KEY, &mut signed)
        .is_ok()
    {
        assert!(verify_envelope_integrity(&signed, &INTEGRITY_KEY));
        assert!(!verify_envelope_integrity(&signed, &[0; 16]));
    }
}

fn encode(message: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = message.encode(&mut out) {
        panic!("{message:?} does not encode: {e}");
    }
    out
}

/// Properties of [`StreamDeframer`] under an arbitrary sequence of reads.
///
/// `data` is a program: each operation is one octet `op`, followed by its operands.
///
/// | `op % 4` | operation                                                                  |
/// |----------|----------------------------------------------------------------------------|
/// | 0        | [`push`](StreamDeframer::push) the next `op / 4 + 1` octets of `data`         |
/// | 1        | [`read_into`](StreamDeframer::read_into) the next `op / 4 + 1` octets of `data` |
/// | 2        | push `count` copies of `value`; operands: `count` (u16, big endian), `value` |
/// | 3        | `read_into` with a read that fails                                          |
///
/// Operation 2 lets a short input build envelopes up to the maximal size. After every operation
/// the envelopes are drained with [`next_envelope`](StreamDeframer::next_envelope), as a runtime
/// does after every read. Checked after every step:
///
/// - [`buffered`](StreamDeframer::buffered) never exceeds [`MAX_BUFFERED`], and the deframer never
///   overflows (a caller that drains after every read of at most one envelope cannot hit the
///   bound);
/// - the envelopes returned, re-encoded, are exactly a prefix of the octets fed (so each header's
///   length is its payload's plus three), and what is buffered is the rest;
/// - when the deframer reports no more envelopes, the rest holds no complete one; when it reports
///   an error, the rest starts with an invalid envelope header. After an error the run stops, as
///   the connection would be closed.
pub fn stream_deframer(data: &[u8]) {
    let mut deframer = StreamDeframer::new();
    // The octets accepted by the deframer and not yet returned in an envelope: what it must be
    // holding. Kept short rather than whole, so that a run stays linear in what was fed.
    let mut pending: Vec<u8> = Vec::new();
    let mut fill = Vec::new();
    let mut rest = data;
    while let Some((&op, after)) = rest.split_first() {
        rest = after;
        match op % 4 {
            0 => {
                let chunk = take(&mut rest, usize::from(op / 4) + 1);
                assert_no_overflow(deframer.push(chunk));
                pending.extend_from_slice(chunk);
            }
            1 => {
                let chunk = take(&mut rest, usize::from(op / 4) + 1);
                let read = deframer.read_into(chunk.len(), |space| {
                    let n = chunk.len().min(space.len());
                    space[..n].copy_from_slice(&chunk[..n]);
                    pending.extend_from_slice(&chunk[..n]);
                    Ok::<_, ()>(n)
                });
                let read = assert_no_overflow(read);
                assert!(read.is_ok_and(|n| n <= chunk.len()));
            }
            2 => {
                let count = match take(&mut rest, 2) {
                    [hi, lo] => usize::from(u16::from_be_bytes([*hi, *lo])),
                    _ => 0,
                };
                let value = take(&mut rest, 1).first().copied().unwrap_or(0);
                fill.clear();
                fill.resize(count, value);
                assert_no_overflow(deframer.push(&fill));
                pending.extend_from_slice(&fill);
            }
            _ => {
                let read = deframer.read_into(usize::from(op), |_| Err::<usize, _>(()));
                assert_eq!(assert_no_overflow(read), Err(()));
            }
        }
        assert!(deframer.buffered() <= MAX_BUFFERED);
        assert_eq!(
            deframer.buffered(),
            pending.len(),
            "deframer lost or invented octets"
        );
        let mut returned = 0;
        loop {
            match deframer.next_envelope() {
                Ok(Some(envelope)) => {
                    let len = envelope.payload.len() + ENVELOPE_HEADER_LEN;
                    assert!(len <= MAX_ENVELOPE_LEN);
                    let Some(expected) = pending.get(returned..returned + len) else {
                        panic!("deframer returned an envelope longer than what it was fed");
                    };
                    let mut encoded = Vec::with_capacity(len);
                    Envelope::encode(envelope.kind, envelope.payload, &mut encoded)
                        .expect("a deframed envelope re-encodes");
                    assert_eq!(encoded, expected, "envelope differs from the stream");
                    returned += len;
                }
                Ok(None) => {
                    pending.drain(..returned);
                    assert_eq!(deframer.buffered(), pending.len());
                    // Nothing complete may be left behind.
                    assert_eq!(Envelope::decode_prefix(&pending), Ok(None));
                    break;
                }
                Err(err) => {
                    pending.drain(..returned);
                    assert_eq!(deframer.buffered(), pending.len());
                    let DeframeError::Envelope(expected) = err else {
                        panic!("next_envelope reported {err:?}");
                    };
                    assert_eq!(
                        Envelope::decode_prefix(&pending).map(|_| ()),
                        Err::<(), EnvelopeError>(expected)
                    );
                    return;
                }
            }
        }
    }
}

/// Unwraps a deframer result that must not be an overflow.
fn assert_no_overflow<T>(result: Result<T, DeframeError>) -> T {
    match result {
        Ok(value) => value,
        Err(err) => panic!("the deframer refused bytes though it was drained: {err}"),
    }
}

/// Splits off up to `n` octets from the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = rest.split_at(n.min(rest.len()));
    *rest = tail;
    head
}

/// Properties of the STUN codec and of [`NatDiscovery`] on an arbitrary datagram.
///
/// - [`decode_binding_response`] accepts only datagrams that pass [`is_stun`], and reports the
///   datagram's transaction id and a usable mapped address.
/// - When [`answer_binding_request`] answers, the answer is a Binding success response that
///   [`decode_binding_response`] reads back as the request's transaction id and the source
///   address (IPv4-mapped IPv6 reported as IPv4), or a 420 error response no larger than the
///   request; when it does not, the output is empty.
/// - A [`NatDiscovery`] drops unsolicited input (before any request, or from an address it did
///   not ask) without an event. Input with the transaction id of its request, from the server it
///   asked, is consumed exactly when it is a Binding success or error response, and produces the
///   matching event.
pub fn stun(data: &[u8]) {
    let looks_like_stun = is_stun(data);
    let transaction_id = data
        .get(8..20)
        .and_then(|id| <[u8; 12]>::try_from(id).ok())
        .map(TransactionId);

    let response = decode_binding_response(data);
    if let Ok(response) = response {
        assert!(looks_like_stun, "decoded a datagram that is not STUN");
        assert_eq!(Some(response.transaction_id), transaction_id);
        assert!(!response.mapped.ip().is_unspecified() && response.mapped.port() != 0);
    }

    // Vary the source address family with the input, mapped IPv6 included.
    let source = match data.len() % 3 {
        0 => SocketAddr::from((Ipv4Addr::new(198, 51, 100, 7), 40_000)),
        1 => SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10), 50_001)),
        _ => SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped(), 3478)),
    };
    let mut answer = vec![0xaa];
    match answer_binding_request(data, source, &mut answer) {
        Ok(id) => {
            assert_eq!(Some(id), transaction_id);
            assert!(is_stun(&answer));
            match decode_binding_response(&answer) {
                Ok(decoded) => {
                    assert_eq!(decoded.transaction_id, id);
                    let canonical = SocketAddr::new(source.ip().to_canonical(), source.port());
                    assert_eq!(decoded.mapped, canonical);
                }
                // Unknown comprehension-required attributes: a 420, never larger than the
                // request.
                Err(StunError::ErrorResponse { code: Some(420) }) => {
                    assert!(answer.len() <= data.len(), "the 420 amplifies");
                }
                Err(e) => panic!("our answer does not decode: {e:?}"),
            }
        }
        Err(_) => assert!(answer.is_empty(), "a refused request left output"),
    }

    nat_discovery(data);
}

/// The [`NatDiscovery`] part of [`stun`].
fn nat_discovery(data: &[u8]) {
    let server = SocketAddr::from((Ipv4Addr::new(203, 0, 113, 1), 3478));
    let stranger = SocketAddr::from((Ipv4Addr::new(203, 0, 113, 2), 3478));
    // The state machine only compares and offsets instants, so any origin will do.
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    let mut discovery = NatDiscovery::new(NatDiscoveryConfig::new(vec![server]), [7; 32], now);

    // Before any request, everything is unsolicited.
    assert!(!discovery.handle_input(now, server, data));
    assert_eq!(discovery.poll_event(), None);

    let mut request = Vec::new();
    let transmit = discovery.poll_transmit(now, &mut request);
    assert_eq!(transmit.map(|t| t.destination), Some(server));
    let Some(id) = request.get(8..20) else {
        panic!("NatDiscovery wrote a request without a transaction id");
    };

    // Give the datagram the transaction id of the request, so that the fuzzer reaches the
    // response path instead of guessing 96 random bits.
    let mut solicited = data.to_vec();
    if let Some(slot) = solicited.get_mut(8..20) {
        slot.copy_from_slice(id);
    }

    let later = now + Duration::from_millis(10);
    assert!(!discovery.handle_input(later, stranger, &solicited));
    assert_eq!(discovery.poll_event(), None);

    let consumed = discovery.handle_input(later, server, &solicited);
    let first = discovery.poll_event();
    match decode_binding_response(&solicited) {
        Ok(response) => {
            assert!(consumed);
            assert_eq!(
                first,
                Some(NatEvent::Mapped {
                    server,
                    mapped: response.mapped
                })
            );
            assert!(matches!(
                discovery.poll_event(),
                Some(NatEvent::Finished(_))
            ));
        }
        Err(StunError::ErrorResponse { code }) => {
            assert!(consumed);
            assert_eq!(
                first,
                Some(NatEvent::ServerFailed {
                    server,
                    error_code: code
                })
            );
            assert!(matches!(
                discovery.poll_event(),
                Some(NatEvent::Finished(_))
            ));
        }
        Err(_) => {
            assert!(!consumed);
            assert_eq!(first, None);
        }
    }
    assert_eq!(discovery.poll_event(), None);
}

/// Decode → encode → decode on messages built from structured parts rather than bytes, which
/// reaches combinations of valid TLVs that byte mutation seldom assembles.
///
/// Builds a [`Message`] from `u`; if it encodes, the encoding is [`Message::encoded_len`]
/// octets long, and if that decodes, the result equals the message. (Not every message that
/// encodes decodes: the encoder does not enforce which TLVs each message type may carry.)
pub fn structured_message(u: &mut Unstructured<'_>) -> ArbitraryResult<()> {
    let message = arbitrary_message(u)?;
    let mut encoded = Vec::new();
    if message.encode(&mut encoded).is_ok() {
        assert_eq!(encoded.len(), message.encoded_len());
        if let Ok(decoded) = Message::decode(&encoded) {
            assert_eq!(decoded, message, "encode → decode changed the message");
        }
    }
    Ok(())
}

fn arbitrary_message<'a>(u: &mut Unstructured<'a>) -> ArbitraryResult<Message<'a>> {
    // Mostly this version and known types: other values are rejected in the header, which the
    // byte-level target covers.
    let version = if u.ratio(1, 32)? {
        u.arbitrary()?
    } else {
        VERSION
    };
    let header = Header {
        version,
        message_type: MessageType(u.int_in_range(0..=13)?),
        sequence: u.arbitrary()?,
        tunnel_id: u.arbitrary()?,
    };
    let mut message = Message {
        header,
        tlvs: Default::default(),
    };
    let t = &mut message.tlvs;
    t.supported_versions = u.arbitrary()?;
    t.tunnel_id = u.arbitrary()?;
    t.reattach_secret = u.arbitrary()?;
    if u.arbitrary()? {
        t.internal_ipv4 = Some(InternalAddress {
            addr: Ipv4Addr::from(u.arbitrary::<[u8; 4]>()?),
            prefix_len: u.int_in_range(0..=33)?,
        });
    }
    if u.arbitrary()? {
        t.internal_ipv6 = Some(InternalAddress {
            addr: Ipv6Addr::from(u.arbitrary::<[u8; 16]>()?),
            prefix_len: u.int_in_range(0..=129)?,
        });
    }
    for _ in 0..u.int_in_range(0..=MAX_DNS_SERVERS)? {
        t.dns_servers.push(arbitrary_ip(u)?);
    }
    t.keepalive_interval_ms = u.arbitrary()?;
    t.result_code = u.arbitrary::<Option<u16>>()?.map(ResultCode);
    t.service_type = u.arbitrary::<Option<u8>>()?.map(ServiceType);
    if u.arbitrary()? {
        t.connection_info = Some(ConnectionInfo {
            transport: Transport(u.arbitrary()?),
            addr: arbitrary_socket(u)?,
        });
    }
    t.peer_service_result = u.arbitrary::<Option<u8>>()?.map(PeerServiceResult);
    for _ in 0..u.int_in_range(0..=MAX_CANDIDATES)? {
        t.candidates.push(Candidate {
            kind: CandidateKind(u.arbitrary()?),
            transport: Transport(u.arbitrary()?),
            addr: arbitrary_socket(u)?,
        });
    }
    if u.arbitrary()? {
        t.peer_credentials = Some(PeerCredentials {
            token: u.arbitrary()?,
            fingerprint: u.arbitrary()?,
        });
    }
    t.client_capabilities = u.arbitrary::<Option<u32>>()?.map(Capabilities);
    if u.arbitrary()? {
        t.peer_internal_address = Some(arbitrary_ip(u)?);
    }
    t.auth_token = u.arbitrary()?;
    t.service_action = u.arbitrary::<Option<u8>>()?.map(ServiceAction);
    t.certificate_fingerprint = u.arbitrary()?;
    if u.arbitrary()? {
        t.observed_address = Some(arbitrary_socket(u)?);
    }
    t.message_integrity = u.arbitrary()?;
    t.client_nonce = u.arbitrary()?;
    t.control_key = u.arbitrary()?;
    t.software = u.arbitrary()?;
    t.diagnostic = u.arbitrary()?;
    t.max_packet_size = u.arbitrary()?;
    t.stun_port = u.arbitrary()?;
    Ok(message)
}

fn arbitrary_ip(u: &mut Unstructured<'_>) -> ArbitraryResult<IpAddr> {
    Ok(if u.arbitrary()? {
        IpAddr::from(u.arbitrary::<[u8; 4]>()?)
    } else {
        IpAddr::from(u.arbitrary::<[u8; 16]>()?)
    })
}

/// A socket address the wire can carry: no IPv6 flow label or scope id.
fn arbitrary_socket(u: &mut Unstructured<'_>) -> ArbitraryResult<SocketAddr> {
    Ok(SocketAddr::new(arbitrary_ip(u)?, u.arbitrary()?))
}

/// A data envelope carrying an IPv4 UDP packet from `src` to `dst` with up to 1,400 arbitrary
/// octets; `None` when the payload does not fit.
fn arbitrary_data_envelope(
    u: &mut Unstructured<'_>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> ArbitraryResult<Option<Vec<u8>>> {
    let len = u.int_in_range(0..=1400)?;
    let payload = u.bytes(len)?;
    let mut packet = Vec::new();
    let builder = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(5004, 5004);
    let mut bytes = Vec::new();
    let built = builder.write(&mut packet, payload).is_ok()
        && Envelope::encode(EnvelopeType::DATA, &packet, &mut bytes).is_ok();
    Ok(built.then_some(bytes))
}

/// A director serving two honest clients against hostile connections driven by `u`.
///
/// Two tunnels are configured first, on TLS connections (the honest pair). Then hostile
/// connections of every transport open and close, send arbitrary bytes, structured control
/// messages (naming the honest tunnels' ids among others) and data envelopes with inner
/// packets from and to any address, while time passes (the honest pair keeps its tunnels
/// alive with keepalives). After every step:
///
/// - the director holds no more tunnels, pending connections or queued frames than its
///   bounds allow, and everything it sends is one valid envelope;
///
/// and at the end the honest tunnels are still held, on their connections and with their
/// addresses, and a packet from one to the other is relayed.
pub fn director(u: &mut Unstructured<'_>) -> ArbitraryResult<()> {
    use crate::director::SessionDirector;
    use crate::director::{ConnectionHandle, ConnectionInfo as Conn, DirectorConfig, Ipv4Pool};

    let config = DirectorConfig {
        ipv4_pool: Some(Ipv4Pool::new(Ipv4Addr::new(10, 9, 0, 0), 28)),
        ipv6_pool: None,
        max_tunnels: 8,
        max_pending_connections: 4,
        max_queued_frames: 8,
        max_total_queued_frames: 32,
        max_held_frames: 4,
        max_total_held_frames: 8,
        ..DirectorConfig::default()
    };
    let bound = config.max_queued_frames.max(config.max_held_frames);
    let (max_tunnels, max_pending) = (config.max_tunnels, config.max_pending_connections);
    let mut d = SessionDirector::new(config).expect("a valid configuration");
    #[allow(clippy::disallowed_methods)] // The base instant only anchors virtual time.
    let mut now = Instant::now();
    let mut buf = Vec::new();
    let mut drain = |d: &mut SessionDirector, now: Instant| {
        let mut sent = Vec::new();
        while let Some(t) = d.poll_transmit(now, &mut buf) {
            assert!(
                Envelope::decode_datagram(&buf).is_ok(),
                "the director sent {buf:?}, not one envelope"
            );
            sent.push((t.connection, buf.clone()));
        }
        while d.poll_event().is_some() {}
        sent
    };

    // The honest pair.
    let mut honest = Vec::new();
    for i in 0..2u64 {
        let handle = honest_connect(&mut d, now, i, None);
        let (_, answer) = drain(&mut d, now).pop().expect("a Configuration Response");
        honest.push(configured(handle, &answer));
    }

    let mut hostile: Vec<ConnectionHandle> = Vec::new();
    let mut next = 100u64;
    let mut sequence = 1u32;
    for _ in 0..256 {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0..=5)? {
            0 if hostile.len() < 16 => {
                let transports = [
                    Transport::UDP,
                    Transport::TCP,
                    Transport::TLS,
                    Transport::QUIC,
                    Transport::DTLS,
                ];
                let info = Conn {
                    transport: *u.choose(&transports)?,
                    remote: arbitrary_socket(u)?,
                    verified_identity: u.arbitrary()?,
                };
                let handle = ConnectionHandle(next);
                next += 1;
                d.handle_connect(now, handle, info).expect("a fresh handle");
                hostile.push(handle);
            }
            1 if !hostile.is_empty() => {
                let i = u.choose_index(hostile.len())?;
                d.handle_disconnect(now, hostile.swap_remove(i));
            }
            2 if !hostile.is_empty() => {
                let handle = *u.choose(&hostile)?;
                let len = u.int_in_range(0..=1500)?;
                d.handle_datagram(now, handle, u.bytes(len)?);
            }
            3 if !hostile.is_empty() => {
                let handle = *u.choose(&hostile)?;
                let mut message = arbitrary_message(u)?;
                message.header.version = VERSION;
                message.header.tunnel_id = match u.int_in_range(0..=3)? {
                    0 => 0,
                    1 => honest[0].1,
                    2 => honest[1].1,
                    _ => u.arbitrary()?,
                };
                let mut bytes = Vec::new();
                if message.encode_envelope(&mut bytes).is_ok() {
                    d.handle_datagram(now, handle, &bytes);
                }
            }
            4 if !hostile.is_empty() => {
                let handle = *u.choose(&hostile)?;
                let pick = |u: &mut Unstructured<'_>| -> ArbitraryResult<Ipv4Addr> {
                    Ok(match u.int_in_range(0..=2)? {
                        0 => honest[0].2,
                        1 => honest[1].2,
                        _ => Ipv4Addr::from(u.arbitrary::<[u8; 4]>()?),
                    })
                };
                let (src, dst) = (pick(u)?, pick(u)?);
                if let Some(bytes) = arbitrary_data_envelope(u, src, dst)? {
                    d.handle_datagram(now, handle, &bytes);
                }
            }
            _ => {
                // The honest pair keeps its tunnels alive; time passes.
                for (handle, id, _, key) in &honest {
                    sequence += 1;
                    let mut bytes = Vec::new();
                    let m = Message::new(MessageType::KEEPALIVE, sequence, *id);
                    m.encode_envelope_with_integrity(&key.client_to_director(), &mut bytes)
                        .expect("encodable");
                    d.handle_datagram(now, *handle, &bytes);
                }
                now += Duration::from_millis(u.int_in_range(0..=20_000)?);
                d.handle_timeout(now);
            }
        }
        drain(&mut d, now);
        let stats = d.stats();
        assert!(stats.active_tunnels + stats.persistent_tunnels <= max_tunnels);
        assert!(stats.pending_connections <= max_pending);
        for t in d.tunnels() {
            assert!(
                t.queued_frames <= bound,
                "{} frames queued",
                t.queued_frames
            );
        }
    }

    for (handle, id, ip, _) in &honest {
        let held = d.tunnels().find(|t| t.tunnel_id == *id);
        let held = held.unwrap_or_else(|| panic!("honest tunnel {id:#x} is gone"));
        assert_eq!(
            held.connection,
            Some(*handle),
            "honest tunnel {id:#x} moved"
        );
        assert_eq!(held.ipv4, Some(*ip));
    }
    let mut packet = Vec::new();
    etherparse::PacketBuilder::ipv4(honest[0].2.octets(), honest[1].2.octets(), 64)
        .udp(5004, 5004)
        .write(&mut packet, b"still relayed")
        .expect("a packet");
    let mut bytes = Vec::new();
    Envelope::encode(EnvelopeType::DATA, &packet, &mut bytes).expect("fits");
    d.handle_datagram(now, honest[0].0, &bytes);
    let sent = drain(&mut d, now);
    assert!(
        sent.iter()
            .any(|(c, b)| *c == honest[1].0 && b[3..] == packet[..]),
        "the honest pair no longer relays"
    );
    Ok(())
}

/// A director of a cluster against a hostile mesh link, a hostile registry and hostile
/// clients, driven by `u`.
///
/// The registry is honest (a [`MemoryRegistry`](crate::cluster::MemoryRegistry)) until two
/// honest tunnels are configured; then each step is one of: a hostile client connection opens
/// or sends arbitrary bytes or a structured control message (re-attaches of arbitrary tunnel
/// ids among them, which park); the mesh link (a director the runtime authenticated, trusted to
/// be one, not to be right) sends arbitrary bytes, structured mesh messages or data envelopes
/// from and to any address; a request the director made is answered with anything, or an
/// answer names no request; or time passes with the registry answering honestly. After every
/// step:
///
/// - the director holds no more tunnels, pending connections or queued frames than its bounds
///   allow, everything it sends is one valid envelope, and no more registry requests are
///   unanswered than `max_in_flight`;
///
/// and at the end, if the mesh did not announce the adoption of an honest tunnel, a packet
/// from one honest tunnel to the other is relayed.
pub fn cluster_director(u: &mut Unstructured<'_>) -> ArbitraryResult<()> {
    use crate::cluster::{
        AddressHolder, ClusterConfig, DirectorName, MemoryRegistry, MeshMessage, RegistryRequest,
        RegistryResponse, RequestId, TunnelRecord,
    };
    use crate::director::SessionDirector;
    use crate::director::{ConnectionHandle, ConnectionInfo as Conn, DirectorConfig, Ipv4Pool};
    use crate::wire::ControlKey;

    let name = |n: &str| DirectorName::new(n).expect("a name");
    let mesh: SocketAddr = SocketAddr::from(([192, 0, 2, 2], 4450));
    let mut cluster = ClusterConfig::new(name("dir-b"), [9; 32], mesh);
    cluster.address_stock = 4;
    cluster.max_in_flight = 16;
    let max_in_flight = cluster.max_in_flight;
    let config = DirectorConfig {
        ipv4_pool: Some(Ipv4Pool::new(Ipv4Addr::new(10, 9, 0, 0), 28)),
        ipv6_pool: None,
        max_tunnels: 8,
        max_pending_connections: 4,
        max_queued_frames: 8,
        max_total_queued_frames: 32,
        max_held_frames: 4,
        max_total_held_frames: 8,
        cluster: Some(cluster),
        ..DirectorConfig::default()
    };
    let bound = config.max_queued_frames.max(config.max_held_frames);
    let (max_tunnels, max_pending) = (config.max_tunnels, config.max_pending_connections);
    let mut d = SessionDirector::new(config).expect("a valid configuration");
    let mut registry = MemoryRegistry::new();
    #[allow(clippy::disallowed_methods)] // The base instant only anchors virtual time.
    let mut now = Instant::now();
    let mut buf = Vec::new();
    let mut outstanding: Vec<(RequestId, RegistryRequest)> = Vec::new();
    let mut drain = |d: &mut SessionDirector, now: Instant, out: &mut Vec<_>| {
        let mut sent = Vec::new();
        while let Some(t) = d.poll_transmit(now, &mut buf) {
            assert!(
                Envelope::decode_datagram(&buf).is_ok(),
                "the director sent {buf:?}, not one envelope"
            );
            sent.push((t.connection, buf.clone()));
        }
        while d.poll_event().is_some() {}
        out.extend(std::iter::from_fn(|| d.poll_registry()));
        sent
    };
    let honest_registry =
        |d: &mut SessionDirector, r: &mut MemoryRegistry, now: Instant, out: &mut Vec<_>| {
            for (id, request) in std::mem::take(out) {
                let response = r.execute(now, &request);
                d.handle_registry(now, id, response);
            }
        };
    drain(&mut d, now, &mut outstanding);
    while !outstanding.is_empty() {
        honest_registry(&mut d, &mut registry, now, &mut outstanding);
        drain(&mut d, now, &mut outstanding);
    }

    // The mesh link, from a director that sorts lower and dialed this one.
    let link = ConnectionHandle(1_000);
    d.handle_mesh_connect(now, link, Some(name("dir-a")))
        .expect("a fresh handle");

    // The honest pair.
    let mut honest = Vec::new();
    for i in 0..2u64 {
        let peer = Some(Capabilities::PEER_TUNNELING);
        let handle = honest_connect(&mut d, now, i, peer);
        let sent = drain(&mut d, now, &mut outstanding);
        honest_registry(&mut d, &mut registry, now, &mut outstanding);
        let (_, answer) = sent
            .into_iter()
            .find(|(c, _)| *c == handle)
            .expect("a Configuration Response");
        honest.push(configured(handle, &answer));
    }

    let mut hostile: Vec<ConnectionHandle> = Vec::new();
    let mut next = 100u64;
    let mut sequence = 1u32;
    let mut adopted_away = false;
    let pick = |u: &mut Unstructured<'_>,
                honest: &[(ConnectionHandle, u64, Ipv4Addr, ControlKey)]| {
        Ok::<_, arbitrary::Error>(match u.int_in_range(0..=3)? {
            0 => honest[0].2,
            1 => honest[1].2,
            2 => Ipv4Addr::new(10, 9, 0, u.int_in_range(0..=15)?),
            _ => Ipv4Addr::from(u.arbitrary::<[u8; 4]>()?),
        })
    };
    for _ in 0..256 {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0..=8)? {
            0 if hostile.len() < 8 => {
                let info = Conn {
                    transport: *u.choose(&[Transport::UDP, Transport::TLS])?,
                    remote: arbitrary_socket(u)?,
                    verified_identity: u.arbitrary()?,
                };
                let handle = ConnectionHandle(next);
                next += 1;
                d.handle_connect(now, handle, info).expect("a fresh handle");
                hostile.push(handle);
            }
            1 if !hostile.is_empty() => {
                let handle = *u.choose(&hostile)?;
                let len = u.int_in_range(0..=200)?;
                d.handle_datagram(now, handle, u.bytes(len)?);
            }
            2 if !hostile.is_empty() => {
                let handle = *u.choose(&hostile)?;
                let mut message = arbitrary_message(u)?;
                message.header.version = VERSION;
                if u.arbitrary()? {
                    // A re-attach of a tunnel held here, elsewhere, or nowhere.
                    message.header.message_type = MessageType::CONFIGURATION_REQUEST;
                    message.tlvs.tunnel_id = Some(match u.int_in_range(0..=2)? {
                        0 => honest[0].1,
                        1 => u.int_in_range(1..=4)?,
                        _ => u.arbitrary()?,
                    });
                }
                let mut bytes = Vec::new();
                if message.encode_envelope(&mut bytes).is_ok() {
                    d.handle_datagram(now, handle, &bytes);
                }
            }
            3 => {
                let len = u.int_in_range(0..=200)?;
                d.handle_datagram(now, link, u.bytes(len)?);
            }
            4 => {
                let addr = IpAddr::V4(pick(u, &honest)?);
                let mut inner = Vec::new();
                let message = arbitrary_message(u)?;
                let _ = message.encode(&mut inner);
                let id = match u.int_in_range(0..=2)? {
                    0 => honest[0].1,
                    1 => honest[1].1,
                    _ => u.arbitrary()?,
                };
                let mesh_message = match u.int_in_range(0..=5)? {
                    0 => MeshMessage::Hello(name(u.choose(&["dir-a", "dir-b", "dir-c"])?)),
                    1 => MeshMessage::NotHere(addr),
                    2 => MeshMessage::Adopted {
                        id,
                        addresses: vec![addr],
                    },
                    3 => MeshMessage::PeerRequest {
                        exchange: u.arbitrary()?,
                        destination: addr,
                        request: &inner,
                    },
                    4 => MeshMessage::PeerAnswer {
                        exchange: u.int_in_range(0..=4)?,
                        response: &inner,
                    },
                    _ => MeshMessage::PeerGone {
                        departed: IpAddr::V4(pick(u, &honest)?),
                        partners: vec![addr],
                    },
                };
                if let MeshMessage::Adopted { id, addresses } = &mesh_message {
                    adopted_away |= honest
                        .iter()
                        .any(|(_, h, ip, _)| h == id && addresses == &[IpAddr::V4(*ip)]);
                }
                let mut bytes = Vec::new();
                if mesh_message.encode_envelope(&mut bytes).is_ok() {
                    d.handle_datagram(now, link, &bytes);
                }
            }
            5 => {
                let (src, dst) = (pick(u, &honest)?, pick(u, &honest)?);
                if let Some(bytes) = arbitrary_data_envelope(u, src, dst)? {
                    d.handle_datagram(now, link, &bytes);
                }
            }
            6 if !outstanding.is_empty() => {
                // Any answer to a request in flight.
                let k = u.choose_index(outstanding.len())?;
                let (id, _) = outstanding.swap_remove(k);
                let owner = name(u.choose(&["dir-a", "dir-b", "dir-c"])?);
                let response = match u.int_in_range(0..=6)? {
                    0 => RegistryResponse::Directors(vec![(owner, arbitrary_socket(u)?)]),
                    1 => RegistryResponse::Claimed(u.arbitrary()?),
                    2 => RegistryResponse::Done,
                    3 => RegistryResponse::Tunnel(Some(TunnelRecord {
                        id: u.arbitrary()?,
                        ipv4: Some(pick(u, &honest)?),
                        ipv6: None,
                        salt: u.arbitrary()?,
                        owner,
                    })),
                    4 => RegistryResponse::Tunnel(None),
                    5 => RegistryResponse::Address(Some(AddressHolder {
                        owner,
                        tunnel: u.arbitrary()?,
                    })),
                    _ => RegistryResponse::Failed("down".to_owned()),
                };
                d.handle_registry(now, id, response);
            }
            7 => d.handle_registry(now, RequestId(u.arbitrary()?), RegistryResponse::Done),
            _ => {
                for (handle, id, _, key) in &honest {
                    sequence += 1;
                    let mut bytes = Vec::new();
                    let m = Message::new(MessageType::KEEPALIVE, sequence, *id);
                    m.encode_envelope_with_integrity(&key.client_to_director(), &mut bytes)
                        .expect("encodable");
                    d.handle_datagram(now, *handle, &bytes);
                }
                now += Duration::from_millis(u.int_in_range(0..=5_000)?);
                d.handle_timeout(now);
                drain(&mut d, now, &mut outstanding);
                honest_registry(&mut d, &mut registry, now, &mut outstanding);
            }
        }
        drain(&mut d, now, &mut outstanding);
        assert!(
            outstanding.len() <= max_in_flight,
            "{} registry requests unanswered",
            outstanding.len()
        );
        let stats = d.stats();
        assert!(stats.active_tunnels + stats.persistent_tunnels <= max_tunnels);
        assert!(stats.pending_connections <= max_pending);
        for t in d.tunnels() {
            assert!(
                t.queued_frames <= bound,
                "{} frames queued",
                t.queued_frames
            );
        }
    }

    let held = honest.iter().all(|(handle, id, _, _)| {
        d.tunnels()
            .any(|t| t.tunnel_id == *id && t.connection == Some(*handle))
    });
    if adopted_away || !held {
        assert!(adopted_away, "an honest tunnel is gone");
        return Ok(());
    }
    let mut packet = Vec::new();
    etherparse::PacketBuilder::ipv4(honest[0].2.octets(), honest[1].2.octets(), 64)
        .udp(5004, 5004)
        .write(&mut packet, b"still relayed")
        .expect("a packet");
    let mut bytes = Vec::new();
    Envelope::encode(EnvelopeType::DATA, &packet, &mut bytes).expect("fits");
    d.handle_datagram(now, honest[0].0, &bytes);
    let sent = drain(&mut d, now, &mut outstanding);
    assert!(
        sent.iter()
            .any(|(c, b)| *c == honest[1].0 && b[3..] == packet[..]),
        "the honest pair no longer relays"
    );
    Ok(())
}

/// A tunnel client against forged input driven by `u`, with an honest director behind its
/// server transport (plain UDP, where anyone who knows the addresses can inject).
///
/// The client opens its tunnel through a real [`SessionDirector`](crate::director::SessionDirector).
/// Then forged input arrives: arbitrary bytes and structured control messages as if from the
/// server (naming the client's tunnel id, unsigned or signed with a guessed key), data
/// envelopes with arbitrary inner packets, and arbitrary datagrams on the peer socket from any
/// address, while time passes and the honest exchange between client and director goes on.
/// After every step:
///
/// - once connected, the client keeps its tunnel id and internal address: nothing forged
///   changes them, and it is never told to close;
/// - it holds no more than its bounds of packets queued for sending;
///
/// and at the end it is still connected, the director still holds its tunnel on the same
/// connection, and a packet the client sends to itself comes back through the director.
pub fn client(u: &mut Unstructured<'_>) -> ArbitraryResult<()> {
    use crate::client::{
        ClientConfig, ClientEvent, ClientState, Destination, Input, ServerEndpoint, TunnelClient,
    };
    use crate::director::SessionDirector;
    use crate::director::{ConnectionHandle, ConnectionInfo as Conn, DirectorConfig, Ipv4Pool};

    let server = SocketAddr::from(([192, 0, 2, 1], 4440));
    let link = ConnectionHandle(1);
    let config = DirectorConfig {
        ipv4_pool: Some(Ipv4Pool::new(Ipv4Addr::new(10, 9, 0, 0), 28)),
        ipv6_pool: None,
        ..DirectorConfig::default()
    };
    let mut d = SessionDirector::new(config).expect("a valid configuration");
    let mut config = ClientConfig::new(vec![ServerEndpoint {
        addr: server,
        transport: Transport::UDP,
    }]);
    config.rng_seed = [7; 32];
    let max_queued = config.max_queued_packets;
    #[allow(clippy::disallowed_methods)] // The base instant only anchors virtual time.
    let start = Instant::now();
    let mut now = start;
    let mut c = TunnelClient::new(config, now).expect("a valid configuration");
    d.handle_connect(
        now,
        link,
        Conn {
            transport: Transport::UDP,
            remote: SocketAddr::from(([198, 51, 100, 7], 40_000)),
            verified_identity: false,
        },
    )
    .expect("a fresh handle");

    // Carries what each side sends to the other until both are quiet; whether the client was
    // told to close its tunnel.
    let mut buf = Vec::new();
    let mut inner = Vec::new();
    let mut exchange = |c: &mut TunnelClient, d: &mut SessionDirector, now: Instant| -> bool {
        let mut closed = false;
        for _ in 0..64 {
            let mut quiet = true;
            while let Some(t) = c.poll_transmit(now, &mut buf) {
                if t.destination == Destination::Server {
                    d.handle_datagram(now, link, &buf);
                    quiet = false;
                }
            }
            while let Some(e) = c.poll_event() {
                match e {
                    ClientEvent::OpenTransport { .. } => {
                        c.handle_input(now, Input::TransportOpen);
                        quiet = false;
                    }
                    ClientEvent::TunnelClosed { .. } | ClientEvent::CloseTransport => {
                        closed = true;
                    }
                    _ => {}
                }
            }
            while let Some(t) = d.poll_transmit(now, &mut buf) {
                if t.connection == link {
                    c.handle_input(now, Input::Envelope(&buf));
                    quiet = false;
                }
            }
            while d.poll_event().is_some() {}
            while c.recv_ip(&mut inner) {}
            if quiet {
                break;
            }
        }
        closed
    };
    // Runs both sides' timers up to `until`, exchanging after each.
    let mut run_until = |c: &mut TunnelClient, d: &mut SessionDirector, until: Instant| -> bool {
        let mut closed = false;
        let mut at = now_of(c, d, until);
        while let Some(t) = at {
            c.handle_timeout(t);
            d.handle_timeout(t);
            closed |= exchange(c, d, t);
            at = now_of(c, d, until).filter(|next| *next > t);
        }
        closed | exchange(c, d, until)
    };
    fn now_of(c: &TunnelClient, d: &SessionDirector, until: Instant) -> Option<Instant> {
        let next = [c.poll_timeout(), d.poll_timeout()];
        next.into_iter().flatten().min().filter(|t| *t <= until)
    }

    run_until(&mut c, &mut d, now);
    now += Duration::from_secs(1);
    assert!(!run_until(&mut c, &mut d, now), "closed while connecting");
    assert_eq!(
        c.state(),
        ClientState::Connected,
        "no tunnel through the director"
    );
    let id = c.tunnel_id().expect("a tunnel id");
    let ip = c.internal_ipv4().expect("an address");

    for _ in 0..256 {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0..=4)? {
            0 => {
                let len = u.int_in_range(0..=1500)?;
                c.handle_input(now, Input::Envelope(u.bytes(len)?));
            }
            1 => {
                let mut message = arbitrary_message(u)?;
                message.header.version = VERSION;
                if u.arbitrary()? {
                    message.header.tunnel_id = id;
                }
                let mut bytes = Vec::new();
                let encoded = match u.arbitrary::<Option<[u8; 32]>>()? {
                    Some(guess) => message.encode_envelope_with_integrity(&guess, &mut bytes),
                    None => message.encode_envelope(&mut bytes),
                };
                if encoded.is_ok() {
                    c.handle_input(now, Input::Envelope(&bytes));
                }
            }
            2 => {
                let src = match u.arbitrary()? {
                    true => ip,
                    false => Ipv4Addr::from(u.arbitrary::<[u8; 4]>()?),
                };
                let dst = match u.arbitrary()? {
                    true => ip,
                    false => Ipv4Addr::from(u.arbitrary::<[u8; 4]>()?),
                };
                if let Some(bytes) = arbitrary_data_envelope(u, src, dst)? {
                    c.handle_input(now, Input::Envelope(&bytes));
                }
            }
            3 => {
                let from = arbitrary_socket(u)?;
                let len = u.int_in_range(0..=1500)?;
                let datagram = u.bytes(len)?;
                c.handle_input(now, Input::PeerDatagram { from, datagram });
            }
            _ => {
                now += Duration::from_millis(u.int_in_range(0..=20_000)?);
            }
        }
        assert!(
            !run_until(&mut c, &mut d, now),
            "forged input closed the tunnel"
        );
        assert!(
            c.queued_packets() <= max_queued,
            "{} queued",
            c.queued_packets()
        );
        if c.state() == ClientState::Connected {
            assert_eq!(c.tunnel_id(), Some(id), "forged input moved the tunnel");
            assert_eq!(
                c.internal_ipv4(),
                Some(ip),
                "forged input moved the address"
            );
        }
    }

    // The honest exchange goes on: the client comes back to (or stays) connected, as it was.
    now += Duration::from_secs(5);
    assert!(!run_until(&mut c, &mut d, now), "the tunnel closed");
    assert_eq!(c.state(), ClientState::Connected);
    assert_eq!((c.tunnel_id(), c.internal_ipv4()), (Some(id), Some(ip)));
    let held = d
        .tunnels()
        .find(|t| t.tunnel_id == id)
        .expect("the director holds it");
    assert_eq!((held.connection, held.ipv4), (Some(link), Some(ip)));
    let mut packet = Vec::new();
    etherparse::PacketBuilder::ipv4(ip.octets(), ip.octets(), 64)
        .udp(5004, 5004)
        .write(&mut packet, b"back through the director")
        .expect("a packet");
    c.send_ip(now, &packet).expect("sent");
    let mut looped = false;
    while let Some(t) = c.poll_transmit(now, &mut buf) {
        if t.destination == Destination::Server {
            d.handle_datagram(now, link, &buf);
        }
    }
    while let Some(t) = d.poll_transmit(now, &mut buf) {
        c.handle_input(now, Input::Envelope(&buf));
        while c.recv_ip(&mut inner) {
            looped |= inner == packet;
        }
        let _ = t;
    }
    assert!(looped, "the client's packet did not come back");
    Ok(())
}

/// Connects honest client `i` over TLS and sends its Configuration Request, announcing
/// `capabilities`; its connection.
fn honest_connect(
    d: &mut crate::director::SessionDirector,
    now: Instant,
    i: u64,
    capabilities: Option<Capabilities>,
) -> crate::director::ConnectionHandle {
    let handle = crate::director::ConnectionHandle(i);
    let info = crate::director::ConnectionInfo {
        transport: Transport::TLS,
        remote: SocketAddr::from(([198, 51, 100, 1 + i as u8], 40_000)),
        verified_identity: false,
    };
    d.handle_connect(now, handle, info).expect("a fresh handle");
    let mut request = Vec::new();
    let mut m = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    m.tlvs.client_nonce = Some([i as u8; 16]);
    m.tlvs.client_capabilities = capabilities;
    m.encode_envelope(&mut request).expect("encodable");
    d.handle_datagram(now, handle, &request);
    handle
}

/// An honest tunnel from its Configuration Response: connection, id, address, key.
fn configured(
    handle: crate::director::ConnectionHandle,
    answer: &[u8],
) -> (
    crate::director::ConnectionHandle,
    u64,
    Ipv4Addr,
    crate::wire::ControlKey,
) {
    let env = Envelope::decode_datagram(answer).expect("an envelope");
    let m = Message::decode(env.payload).expect("a message");
    let ip = m.tlvs.internal_ipv4.expect("an address").addr;
    let key = crate::wire::ControlKey::new(&m.tlvs.control_key.expect("a control key"));
    (handle, m.header.tunnel_id, ip, key)
}
