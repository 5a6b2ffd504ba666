//! The stateless cookie exchange of a DTLS listener (RFC 6347 §4.2.1) and how it is replayed
//! to rtc-dtls (see the documentation of the parent module).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use rtc_dtls::config::HandshakeConfig;
use rtc_dtls::crypto::Certificate;
use rtc_dtls::crypto_provider::providers::{RingProvider, RingRandom};
use rtc_dtls::crypto_provider::{CryptoError, RTCCrypto, RTCCryptoProvider, RTCRandom};

use super::config::{server_builder, ClientCheck};
use super::{DtlsConfigError, COOKIE_LENGTH};

/// Locks `m`, going on with the data if a thread panicked while holding it: the slot holds
/// one cookie or none, consistent at any point.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a server listener accepts handshakes with: the configuration, the crypto provider's
/// cookie slot, and the secret of the cookies ([`DtlsEndpoint::set_acceptor`](super::DtlsEndpoint::set_acceptor)).
pub struct Acceptor {
    pub(super) config: Arc<HandshakeConfig>,
    pub(super) random: Arc<CookieRandom>,
    secret: ring::hmac::Key,
}

impl Acceptor {
    /// An acceptor presenting `certificate`, checking clients as `check` says, with cookies
    /// keyed by `secret` (the caller draws it from a secure source, one per listener).
    pub fn new(
        certificate: Certificate,
        check: ClientCheck,
        secret: [u8; 32],
    ) -> Result<Self, DtlsConfigError> {
        let random = Arc::new(CookieRandom::default());
        let provider = Arc::new(CookieProvider {
            ring: RingProvider::new(),
            random: random.clone(),
        });
        let config = server_builder(certificate, check)
            .with_crypto_provider(provider)
            .build(false, None)
            .map(Arc::new)
            .map_err(|e| DtlsConfigError(e.to_string()))?;
        Ok(Self {
            config,
            random,
            secret: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        })
    }

    /// The cookie of a ClientHello with `random` from `from`, in cookie period `period`.
    pub(super) fn cookie(
        &self,
        period: u64,
        from: SocketAddr,
        random: &[u8],
    ) -> [u8; COOKIE_LENGTH] {
        let mut context = ring::hmac::Context::with_key(&self.secret);
        context.update(&period.to_be_bytes());
        match from {
            SocketAddr::V4(a) => {
                context.update(&[4]);
                context.update(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                context.update(&[6]);
                context.update(&a.ip().octets());
            }
        }
        context.update(&from.port().to_be_bytes());
        context.update(random);
        let mut cookie = [0u8; COOKIE_LENGTH];
        cookie.copy_from_slice(&context.sign().as_ref()[..COOKIE_LENGTH]);
        cookie
    }
}

/// The ring provider, except that the next random fill of a cookie's length can be set.
struct CookieProvider {
    ring: RingProvider,
    random: Arc<CookieRandom>,
}

impl RTCCryptoProvider for CookieProvider {
    fn name(&self) -> &'static str {
        "ring with tscf cookies"
    }

    fn crypto(&self) -> &dyn RTCCrypto {
        self.ring.crypto()
    }

    fn random(&self) -> &dyn RTCRandom {
        &*self.random
    }
}

/// Ring's random source, with a slot for the cookie rtc-dtls draws next.
#[derive(Default)]
pub(super) struct CookieRandom {
    next: Mutex<Option<[u8; COOKIE_LENGTH]>>,
    ring: RingRandom,
}

impl CookieRandom {
    pub(super) fn set_next(&self, cookie: [u8; COOKIE_LENGTH]) {
        *lock(&self.next) = Some(cookie);
    }

    pub(super) fn clear(&self) {
        *lock(&self.next) = None;
    }
}

impl RTCRandom for CookieRandom {
    fn fill(&self, output: &mut [u8]) -> Result<(), CryptoError> {
        if output.len() == COOKIE_LENGTH {
            if let Some(cookie) = lock(&self.next).take() {
                output.copy_from_slice(&cookie);
                return Ok(());
            }
        }
        self.ring.fill(output)
    }
}

/// The parts of an unfragmented ClientHello in the first record of a datagram that the
/// cookie exchange needs (RFC 6347 §4.1 record, §4.2.2 handshake header, §4.2.1 cookie).
pub(super) struct ClientHello<'a> {
    record_version: [u8; 2],
    record_sequence: u64,
    message_sequence: u16,
    version: &'a [u8],
    pub(super) random: &'a [u8],
    session_id: &'a [u8],
    pub(super) cookie: &'a [u8],
    /// Cipher suites, compression methods and extensions, as they are.
    rest: &'a [u8],
}

impl<'a> ClientHello<'a> {
    pub(super) fn parse(datagram: &'a [u8]) -> Option<Self> {
        let be = |bytes: &[u8]| bytes.iter().fold(0u64, |n, b| n << 8 | u64::from(*b));
        let record_len = usize::try_from(be(datagram.get(11..13)?)).ok()?;
        let record = datagram.get(13..13 + record_len)?;
        let length = usize::try_from(be(record.get(1..4)?)).ok()?;
        let fragment_offset = be(record.get(6..9)?);
        let fragment_length = usize::try_from(be(record.get(9..12)?)).ok()?;
        if record.first() != Some(&1) || fragment_offset != 0 || fragment_length != length {
            return None;
        }
        let body = record.get(12..12 + length)?;
        let session_len = usize::from(*body.get(34)?);
        let session_id = body.get(35..35 + session_len)?;
        let cookie_at = 35 + session_len;
        let cookie_len = usize::from(*body.get(cookie_at)?);
        let cookie = body.get(cookie_at + 1..cookie_at + 1 + cookie_len)?;
        Some(Self {
            record_version: [datagram[1], datagram[2]],
            record_sequence: be(datagram.get(5..11)?),
            message_sequence: u16::try_from(be(record.get(4..6)?)).ok()?,
            version: body.get(0..2)?,
            random: body.get(2..34)?,
            session_id,
            cookie,
            rest: body.get(cookie_at + 1 + cookie_len..)?,
        })
    }

    /// Our HelloVerifyRequest with `cookie`, in a record of the ClientHello's record number.
    pub(super) fn verify_request(&self, cookie: &[u8; COOKIE_LENGTH]) -> BytesMut {
        let mut body = vec![0xfe, 0xfd, COOKIE_LENGTH as u8];
        body.extend_from_slice(cookie);
        record(
            self.record_version,
            self.record_sequence,
            handshake(3, 0, &body),
        )
    }

    /// The ClientHello that a ClientHello returning a cookie answers, as rtc-dtls needs to
    /// have seen it: message sequence 0, no cookie, the record number before. `None` unless
    /// this one is the second ClientHello (message sequence 1) of a record number above 0.
    pub(super) fn replayed_first(&self) -> Option<BytesMut> {
        if self.message_sequence != 1 || self.record_sequence == 0 {
            return None;
        }
        let mut body = Vec::with_capacity(36 + self.session_id.len() + self.rest.len());
        body.extend_from_slice(self.version);
        body.extend_from_slice(self.random);
        body.push(u8::try_from(self.session_id.len()).ok()?);
        body.extend_from_slice(self.session_id);
        body.push(0);
        body.extend_from_slice(self.rest);
        Some(record(
            self.record_version,
            self.record_sequence - 1,
            handshake(1, 0, &body),
        ))
    }
}

/// A handshake message of `kind` and `message_sequence`, unfragmented.
fn handshake(kind: u8, message_sequence: u16, body: &[u8]) -> Vec<u8> {
    let length = (body.len() as u32).to_be_bytes();
    let mut out = Vec::with_capacity(12 + body.len());
    out.push(kind);
    out.extend_from_slice(&length[1..]);
    out.extend_from_slice(&message_sequence.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&length[1..]);
    out.extend_from_slice(body);
    out
}

/// A plaintext handshake record (epoch 0) carrying `fragment`.
fn record(version: [u8; 2], sequence: u64, fragment: Vec<u8>) -> BytesMut {
    let mut out = BytesMut::with_capacity(13 + fragment.len());
    out.extend_from_slice(&[22, version[0], version[1], 0, 0]);
    out.extend_from_slice(&sequence.to_be_bytes()[2..]);
    out.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
    out.extend_from_slice(&fragment);
    out
}
