//! Wire codec benchmarks: the control path (decode and encode of a typical Configuration
//! Response) and the data path (envelope, inner packet check, stream deframing).
//!
//! Run with `cargo bench -p tscf-core --bench wire`. The allocation profiler shows that the data
//! path allocates nothing.

use divan::counter::BytesCount;
use divan::{black_box, Bencher};
use etherparse::PacketBuilder;
use tscf_core::wire::{Envelope, EnvelopeType, InnerPacket, Message, StreamDeframer};

#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

const PROTOCOL_MD: &str = include_str!("../../docs/PROTOCOL.md");

/// Size of the data envelope on the data path benchmarks, a typical small media packet.
const DATA_ENVELOPE_LEN: usize = 200;
/// Envelopes in the deframer's input.
const STREAM_ENVELOPES: usize = 1000;
/// Bytes handed to the deframer per read, as a socket read would.
const READ_LEN: usize = 16 * 1024;

fn main() {
    divan::main();
}

/// The control message (envelope stripped) of the `configuration-response` vector.
fn configuration_response() -> Vec<u8> {
    let tag = "```hex vector=configuration-response\n";
    let start = PROTOCOL_MD.find(tag).expect("vector in PROTOCOL.md") + tag.len();
    let block = &PROTOCOL_MD[start..];
    let block = &block[..block.find("```").expect("closed block")];
    let envelope: Vec<u8> = block
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex octet"))
        .collect();
    envelope[3..].to_vec()
}

/// A data envelope of [`DATA_ENVELOPE_LEN`] octets around an IPv4/UDP packet.
fn data_envelope() -> Vec<u8> {
    let builder = PacketBuilder::ipv4([10, 77, 0, 2], [10, 77, 0, 3], 64).udp(5004, 5004);
    let payload = [0x80; DATA_ENVELOPE_LEN - 3 - 20 - 8];
    let mut packet = Vec::new();
    builder.write(&mut packet, &payload).expect("vec write");
    let mut envelope = Vec::new();
    Envelope::encode(EnvelopeType::DATA, &packet, &mut envelope).expect("small payload");
    assert_eq!(envelope.len(), DATA_ENVELOPE_LEN);
    envelope
}

// A fixed sample size: left to itself, divan can settle on one iteration per sample here, which
// the 20 ns timer precision then dominates.
#[divan::bench(sample_size = 256)]
fn control_decode(bencher: Bencher<'_, '_>) {
    let bytes = configuration_response();
    bencher.bench_local(|| Message::decode(black_box(&bytes)).map(|m| m.header.sequence));
}

#[divan::bench(sample_size = 256)]
fn control_encode(bencher: Bencher<'_, '_>) {
    let bytes = configuration_response();
    let message = Message::decode(&bytes).expect("vector decodes");
    // Reused across iterations, as a runtime reuses its transmit buffer.
    let mut out = Vec::with_capacity(bytes.len());
    bencher.bench_local(|| {
        out.clear();
        black_box(&message).encode(&mut out).expect("encodes");
        black_box(out.len())
    });
}

#[divan::bench]
fn data_envelope_decode(bencher: Bencher<'_, '_>) {
    let envelope = data_envelope();
    bencher
        .bench_local(|| Envelope::decode_datagram(black_box(&envelope)).map(|e| e.payload.len()));
}

#[divan::bench]
fn inner_packet_parse(bencher: Bencher<'_, '_>) {
    let envelope = data_envelope();
    let packet = &envelope[3..];
    bencher.bench_local(|| InnerPacket::parse(black_box(packet)).map(|p| p.destination()));
}

#[divan::bench]
fn stream_deframer(bencher: Bencher<'_, '_>) {
    let stream = data_envelope().repeat(STREAM_ENVELOPES);
    // One deframer for all iterations, like one long-lived connection; each iteration ends on
    // an envelope boundary, so it starts empty.
    let mut deframer = StreamDeframer::new();
    bencher
        .counter(BytesCount::new(stream.len()))
        .bench_local(|| {
            let mut envelopes = 0usize;
            for read in black_box(&stream).chunks(READ_LEN) {
                deframer.push(read).expect("drained after every read");
                while let Some(envelope) = deframer.next_envelope().expect("valid stream") {
                    black_box(envelope.payload);
                    envelopes += 1;
                }
            }
            assert_eq!(envelopes, STREAM_ENVELOPES);
        });
}

/// The low-load pattern: every read returns exactly one envelope (small packets, a quiet
/// connection), so the deframer drains empty after each one.
#[divan::bench]
fn stream_deframer_one_envelope_per_read(bencher: Bencher<'_, '_>) {
    let envelope = data_envelope();
    let mut deframer = StreamDeframer::new();
    bencher
        .counter(BytesCount::new(envelope.len()))
        .bench_local(|| {
            let read = deframer.read_into(READ_LEN, |space| {
                space[..envelope.len()].copy_from_slice(black_box(&envelope));
                Ok::<_, ()>(envelope.len())
            });
            assert_eq!(read, Ok(Ok(envelope.len())));
            let envelope = deframer.next_envelope().expect("valid").expect("complete");
            black_box(envelope.payload.len())
        });
}
