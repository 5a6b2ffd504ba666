//! The `tscf server` configuration file (TOML). Every key is optional; unknown keys are
//! errors, and every error names the key and the reason.
//!
//! ```toml
//! tcp = ["127.0.0.1:4440"]          # plain TCP listeners
//! tls = ["127.0.0.1:4443"]          # TLS listeners
//! udp = ["127.0.0.1:4440"]          # UDP listeners (tscf and STUN)
//! quic = ["127.0.0.1:4444"]         # QUIC listeners (UDP; the TLS identity, ALPN "tscf")
//! dtls = ["127.0.0.1:4445"]         # DTLS 1.2 listeners (UDP; the TLS identity)
//! ipv4_pool = "10.77.0.0/16"        # internal IPv4 addresses ("" for none)
//! ipv6_pool = "fd77::/48"           # internal IPv6 addresses ("" for none)
//! peer_tunneling = true             # offer the peer service (PROTOCOL.md §7)
//! max_packet_len = 1400             # largest inner IP packet relayed, told to clients
//! auth_tokens = ["secret"]          # required for listeners beyond loopback
//! allow_plain = false               # plain tcp/udp listeners beyond loopback (read: insecure)
//! admin = "127.0.0.1:4449"          # `tscf status` endpoint, loopback only ("" for none)
//! metrics = "127.0.0.1:9477"        # Prometheus metrics at http://ADDR/metrics (default none)
//! shutdown_grace_ms = 2000          # at a stop, how long to wait for clients to acknowledge
//!
//! [tls_identity]                    # default: self-signed for the names below
//! self_signed = ["127.0.0.1", "localhost"]
//! # cert = "server.pem"             # or a PEM chain and key
//! # key = "server.key"
//!
//! [cluster]                         # one director of a cluster (docs/CLUSTER.md); default none
//! name = "dir-a"                    # this director: a-z, 0-9, '-'; its certificate's DNS name
//! redis = "redis://127.0.0.1:6379/" # the registry (Redis or Valkey; redis://:password@host/)
//! # redis = "redis+sentinel://10.0.0.1,10.0.0.2,10.0.0.3/mymaster" # or the master sentinels name
//! secret_file = "cluster.secret"    # 64 hex digits, the same on every director
//! # secret = "00112233…"            # or inline
//! mesh = "0.0.0.0:4450"             # the mesh listener (mutual TLS under the cluster CA)
//! advertise = "192.0.2.10:4450"     # where the others dial it (default: mesh)
//! ca = "cluster-ca.pem"             # the cluster CA
//! cert = "dir-a.pem"                # this director's certificate (SAN: DNS name = name)
//! key = "dir-a.key"
//! namespace = "default"             # the registry keys' hash tag: tscf:{namespace}:…
//! heartbeat_ms = 1000               # how often the director renews its lease
//! director_lease_ms = 3000          # a director silent this long is taken for dead
//! ```
//!
//! [`ClientFile`] is the `tscf client --config` file; [`TransportArg`], [`parse_forward`] and
//! [`parse_listen`] read what it shares with the command line.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use serde::Deserialize;
use tscf_runtime_smol::core::cluster::{ClusterConfig, DirectorName};
use tscf_runtime_smol::core::director::{DirectorConfig, Ipv4Pool, Ipv6Pool};
use tscf_runtime_smol::core::tls::{self, MeshTlsConfig};
use tscf_runtime_smol::{
    ClusterEndpoints, RedisRegistry, ServerConfig, ServerIdentity, ServerTlsConfig, OS,
};

#[cfg(test)]
use crate::forward::Protocol;
use crate::forward::{parse_forward, parse_listen, Forward, Listen};

/// The configuration used without `--config`.
pub(crate) const DEFAULT: &str = r#"
tcp = ["127.0.0.1:4440"]
tls = ["127.0.0.1:4443"]
udp = ["127.0.0.1:4440"]
quic = ["127.0.0.1:4444"]
dtls = ["127.0.0.1:4445"]
ipv4_pool = "10.77.0.0/16"
ipv6_pool = "fd77::/48"
peer_tunneling = true

[tls_identity]
self_signed = ["127.0.0.1", "localhost"]
"#;

/// The file's contents.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerFile {
    #[serde(default)]
    tcp: Vec<SocketAddr>,
    #[serde(default)]
    tls: Vec<SocketAddr>,
    #[serde(default)]
    udp: Vec<SocketAddr>,
    #[serde(default)]
    quic: Vec<SocketAddr>,
    #[serde(default)]
    dtls: Vec<SocketAddr>,
    ipv4_pool: Option<Pool<Ipv4Addr>>,
    ipv6_pool: Option<Pool<Ipv6Addr>>,
    peer_tunneling: Option<bool>,
    max_packet_len: Option<usize>,
    #[serde(default)]
    auth_tokens: Vec<String>,
    /// Allow plain TCP and UDP listeners on addresses beyond loopback.
    #[serde(default)]
    allow_plain: bool,
    tls_identity: Option<Identity>,
    admin: Option<String>,
    metrics: Option<String>,
    /// At a stop, how long to wait at most for the clients to acknowledge their release
    /// notifications (retransmitted meanwhile on datagram transports), in milliseconds.
    shutdown_grace_ms: Option<u64>,
    cluster: Option<Cluster>,
}

/// The `[cluster]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cluster {
    name: String,
    redis: String,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    mesh: SocketAddr,
    advertise: Option<SocketAddr>,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    namespace: Option<String>,
    heartbeat_ms: Option<u64>,
    director_lease_ms: Option<u64>,
}

impl Cluster {
    /// The director's side, the mesh listener and the runtime's side; reads the secret file
    /// and the PEM files.
    fn configs(self) -> Result<(ClusterConfig, SocketAddr, ClusterEndpoints), String> {
        let name = DirectorName::new(&self.name)
            .map_err(|e| format!("cluster.name: {:?}: {e}", self.name))?;
        tls::mesh_server_name(&name).map_err(|_| {
            format!("cluster.name: {name} is not a DNS name (it starts or ends with '-')")
        })?;
        let secret = match (&self.secret, &self.secret_file) {
            (Some(_), Some(_)) => return Err("cluster: secret or secret_file, not both".into()),
            (None, None) => return Err("cluster: secret or secret_file is required".into()),
            (Some(hex), None) => parse_secret(hex).map_err(|e| format!("cluster.secret: {e}"))?,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cluster.secret_file: {}: {e}", path.display()))?;
                parse_secret(text.trim())
                    .map_err(|e| format!("cluster.secret_file: {}: {e}", path.display()))?
            }
        };
        let advertise = self.advertise.unwrap_or(self.mesh);
        if advertise.ip().is_unspecified() || advertise.port() == 0 {
            return Err(format!(
                "cluster.advertise: the other directors cannot dial {advertise}; name the \
                 address they reach this one at"
            ));
        }
        let mut config = ClusterConfig::new(name, secret, advertise);
        if let Some(ms) = self.heartbeat_ms {
            if ms == 0 {
                return Err("cluster.heartbeat_ms: must be above 0".into());
            }
            config.heartbeat = Duration::from_millis(ms);
        }
        if let Some(ms) = self.director_lease_ms {
            config.director_lease = Duration::from_millis(ms);
        }
        if config.director_lease <= config.heartbeat {
            return Err(format!(
                "cluster.director_lease_ms: {} ms is not longer than the heartbeat ({} ms)",
                config.director_lease.as_millis(),
                config.heartbeat.as_millis()
            ));
        }
        let namespace = self.namespace.unwrap_or_else(|| "default".to_owned());
        let ok = !namespace.is_empty()
            && namespace.len() <= 64
            && namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !ok {
            return Err(format!(
                "cluster.namespace: {namespace:?} is not 1 to 64 of a-z, A-Z, 0-9, '-', '_', '.'"
            ));
        }
        let registry = RedisRegistry::new(&self.redis, &namespace)
            .map_err(|e| format!("cluster.redis: {e}"))?;
        let mesh = MeshTlsConfig {
            ca: self.ca,
            cert: self.cert,
            key: self.key,
        };
        let mesh_tls =
            tls::mesh_tls(&mesh, OS).map_err(|e| format!("cluster (ca, cert, key): {e}"))?;
        Ok((config, self.mesh, ClusterEndpoints::new(registry, mesh_tls)))
    }
}

/// 32 octets from 64 hex digits.
fn parse_secret(hex: &str) -> Result<[u8; 32], String> {
    let mut secret = [0u8; 32];
    let digits = hex.as_bytes();
    if digits.len() != 64 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!("not 64 hex digits ({} characters)", hex.len()));
    }
    for (k, byte) in secret.iter_mut().enumerate() {
        // Checked above: two ASCII hex digits.
        *byte = u8::from_str_radix(&hex[2 * k..2 * k + 2], 16).map_err(|e| e.to_string())?;
    }
    if secret == [0; 32] {
        return Err("all zeros is no secret".into());
    }
    Ok(secret)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Identity {
    #[serde(default)]
    self_signed: Vec<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// `network/prefix`, or the empty string for no pool.
#[derive(Debug, Deserialize)]
#[serde(try_from = "String", bound = "A: std::str::FromStr")]
struct Pool<A>(Option<(A, u8)>);

impl<A: std::str::FromStr> TryFrom<String> for Pool<A> {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(Self(None));
        }
        let bad = || format!("{text:?} is not network/prefix-length");
        let (net, len) = text.split_once('/').ok_or_else(bad)?;
        let net = net.parse().map_err(|_| bad())?;
        let len = len.parse().map_err(|_| bad())?;
        Ok(Self(Some((net, len))))
    }
}

impl ServerFile {
    pub(crate) fn default_config() -> Result<Self, String> {
        Self::parse(DEFAULT)
    }

    /// Parses TOML; the error shows the line, the key and the reason.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| e.to_string())
    }

    /// The admin endpoint's address: `admin`, 127.0.0.1:4449 without it, none for `""`.
    /// Refused beyond loopback.
    pub(crate) fn admin_addr(&self) -> Result<Option<SocketAddr>, String> {
        let text = self.admin.as_deref().unwrap_or(crate::admin::DEFAULT_ADDR);
        if text.is_empty() {
            return Ok(None);
        }
        let addr: SocketAddr = text
            .parse()
            .map_err(|_| format!("admin: {text:?} is not an address and port"))?;
        crate::admin::check(addr).map(Some)
    }

    /// The metrics endpoint's address: `metrics`, none without it or for `""`.
    pub(crate) fn metrics_addr(&self) -> Result<Option<SocketAddr>, String> {
        match self.metrics.as_deref() {
            None | Some("") => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|_| format!("metrics: {text:?} is not an address and port")),
        }
    }

    /// The runtime's configuration, and with a `[cluster]` table what the server runs for it.
    pub(crate) fn into_server_config(
        mut self,
    ) -> Result<(ServerConfig, Option<ClusterEndpoints>), String> {
        let cluster = self.cluster.take().map(Cluster::configs).transpose()?;
        let mut config = ServerConfig {
            tcp: self.tcp,
            tls: self.tls,
            udp: self.udp,
            quic: self.quic,
            dtls: self.dtls,
            allow_plain_beyond_loopback: self.allow_plain,
            ..ServerConfig::default()
        };
        if let Some(Pool(p)) = self.ipv4_pool {
            config.director.ipv4_pool = p.map(|(n, l)| Ipv4Pool::new(n, l));
        }
        if let Some(Pool(p)) = self.ipv6_pool {
            config.director.ipv6_pool = p.map(|(n, l)| Ipv6Pool::new(n, l));
        }
        if let Some(ms) = self.shutdown_grace_ms {
            config.shutdown_grace = std::time::Duration::from_millis(ms);
        }
        if let Some(on) = self.peer_tunneling {
            config.director.peer_tunneling = on;
        }
        if let Some(len) = self.max_packet_len {
            let allowed = DirectorConfig::MAX_PACKET_LEN;
            if !allowed.contains(&len) {
                return Err(format!(
                    "max_packet_len: {len} is not {} to {} octets",
                    allowed.start(),
                    allowed.end()
                ));
            }
            config.director.max_packet_len = len;
        }
        config.director.admission.tokens = self
            .auth_tokens
            .into_iter()
            .map(String::into_bytes)
            .collect();
        let identity = match self.tls_identity {
            None if config.tls.is_empty() && config.quic.is_empty() && config.dtls.is_empty() => {
                None
            }
            None => Some(ServerIdentity::SelfSigned {
                names: vec!["127.0.0.1".into(), "localhost".into()],
            }),
            Some(Identity {
                cert: Some(cert),
                key: Some(key),
                ..
            }) => Some(ServerIdentity::PemFiles { cert, key }),
            Some(Identity {
                cert: Some(_),
                key: None,
                ..
            }) => return Err("tls_identity.cert needs tls_identity.key".into()),
            Some(Identity {
                cert: None,
                key: Some(_),
                ..
            }) => return Err("tls_identity.key needs tls_identity.cert".into()),
            Some(Identity { self_signed, .. }) => {
                Some(ServerIdentity::SelfSigned { names: self_signed })
            }
        };
        config.tls_config = identity.map(|identity| ServerTlsConfig {
            identity,
            client_ca: None,
        });
        let endpoints = cluster.map(|(cluster, mesh, endpoints)| {
            config.director.cluster = Some(cluster);
            config.mesh = vec![mesh];
            endpoints
        });
        Ok((config, endpoints))
    }
}

/// The `tscf client --config` file (TOML). Every key is optional; unknown keys are errors.
///
/// ```toml
/// server = "203.0.113.1:4440"       # the server's address
/// servers = ["203.0.113.1:4440", "203.0.113.2:4440"]  # or several of one cluster, in order
/// transport = "udp"                 # tcp, tls, udp, dtls or quic
/// fingerprint = "14bc…"             # the server certificate's SHA-256 (tls, dtls, quic)
/// token = "secret"                  # the admission token
/// stun = ["203.0.113.2:3478"]       # STUN servers (default: the server's responder)
/// forward = ["127.0.0.1:5004=10.77.0.3:5004", "tcp:127.0.0.1:8080=10.77.0.3:80"]
/// listen = ["udp:5004=127.0.0.1:5004"]  # inner port to a fixed local address (ssh -R)
/// peer = true                       # opt the forwarded sockets in to peer tunneling
/// keepalive = 20                    # seconds between keepalives to the server when idle
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientFile {
    pub(crate) server: Option<SocketAddr>,
    #[serde(default)]
    pub(crate) servers: Vec<SocketAddr>,
    pub(crate) transport: Option<TransportArg>,
    pub(crate) fingerprint: Option<String>,
    pub(crate) token: Option<String>,
    #[serde(default)]
    pub(crate) stun: Vec<SocketAddr>,
    #[serde(default)]
    pub(crate) forward: Vec<FileForward>,
    #[serde(default)]
    pub(crate) listen: Vec<FileListen>,
    pub(crate) peer: Option<bool>,
    pub(crate) keepalive: Option<u64>,
}

/// A `[udp:|tcp:]LOCAL=INTERNAL` forward, as on the command line.
#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct FileForward(pub(crate) Forward);

impl TryFrom<String> for FileForward {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        parse_forward(&text).map(FileForward)
    }
}

/// A `[udp:|tcp:]PORT=LOCAL` listen, as on the command line.
#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct FileListen(pub(crate) Listen);

impl TryFrom<String> for FileListen {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        parse_listen(&text).map(FileListen)
    }
}

impl ClientFile {
    /// Parses TOML; the error shows the line, the key and the reason.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| e.to_string())
    }
}

/// The transport to the server, as `--transport` and the file's `transport` name it.
#[derive(Clone, Copy, Debug, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TransportArg {
    Tcp,
    Tls,
    Udp,
    /// DTLS 1.2 over UDP, verified by --fingerprint like TLS.
    Dtls,
    /// QUIC (TLS 1.3, ALPN "tscf"): data frames as QUIC datagrams, verified by --fingerprint
    /// like TLS.
    Quic,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_configuration_parses() {
        let c = ServerFile::default_config()
            .and_then(ServerFile::into_server_config)
            .map(|(c, _)| c)
            .expect("default parses");
        let addr = |text: &str| text.parse::<SocketAddr>().expect("addr");
        assert_eq!(c.tcp, vec![addr("127.0.0.1:4440")]);
        assert_eq!(c.quic, vec![addr("127.0.0.1:4444")]);
        assert_eq!(c.dtls, vec![addr("127.0.0.1:4445")]);
        assert!(c.director.peer_tunneling);
        assert!(c.tls_config.is_some());
        let f = ServerFile::default_config().expect("default parses");
        assert_eq!(f.admin_addr(), Ok(Some(addr("127.0.0.1:4449"))));
    }

    #[test]
    fn the_admin_endpoint_stays_on_loopback() {
        let f = ServerFile::parse("admin = \"0.0.0.0:4449\"").expect("parses");
        assert!(f.admin_addr().expect_err("refused").contains("loopback"));
        let f = ServerFile::parse("admin = \"\"").expect("parses");
        assert_eq!(f.admin_addr(), Ok(None));
        let f = ServerFile::parse("admin = \"[::1]:0\"").expect("parses");
        assert!(f.admin_addr().expect("loopback").is_some());
    }

    #[test]
    fn client_file_takes_stun_servers_and_forwards() {
        let f = ClientFile::parse(
            "server = \"192.0.2.1:4440\"\ntransport = \"udp\"\n\
             stun = [\"192.0.2.2:3478\", \"192.0.2.3:3478\"]\n\
             forward = [\"127.0.0.1:0=10.77.0.3:5004\", \"tcp:[::1]:0=10.77.0.3:80\"]\n\
             listen = [\"tcp:8080=127.0.0.1:80\"]\npeer = true\nkeepalive = 10\n",
        )
        .expect("parses");
        assert_eq!(f.stun.len(), 2);
        assert_eq!(f.forward.len(), 2);
        assert_eq!(f.forward[0].0.protocol, Protocol::Udp);
        assert_eq!(f.forward[1].0.protocol, Protocol::Tcp);
        assert_eq!(f.forward[1].0.internal.port(), 80);
        assert_eq!(f.listen[0].0.port, 8080);
        assert_eq!(f.listen[0].0.protocol, Protocol::Tcp);
        let e = ClientFile::parse("listen = [\"tcp:x=127.0.0.1:1\"]").expect_err("no port");
        assert!(e.contains("listen"), "{e}");
        assert_eq!(f.peer, Some(true));
        assert_eq!(f.keepalive, Some(10));
        let e = ClientFile::parse("stun = [\"nowhere\"]").expect_err("bad address");
        assert!(e.contains("stun"), "{e}");
        let e = ClientFile::parse("forward = [\"127.0.0.1:1\"]").expect_err("no =");
        assert!(e.contains("forward"), "{e}");
        let e = ClientFile::parse("stun_servers = []").expect_err("unknown key");
        assert!(e.contains("stun_servers"), "{e}");
    }

    #[test]
    fn the_packet_limit_is_checked_with_its_key() {
        let f = ServerFile::parse("max_packet_len = 9000").expect("parses");
        let (c, _) = f.into_server_config().expect("a jumbo limit is fine");
        assert_eq!(c.director.max_packet_len, 9000);
        let f = ServerFile::parse("max_packet_len = 40").expect("parses");
        let e = f.into_server_config().expect_err("below 68");
        assert!(e.contains("max_packet_len"), "{e}");
    }

    #[test]
    fn plain_listeners_beyond_loopback_are_allowed_only_by_name() {
        let text = "udp = [\"0.0.0.0:4440\"]\nauth_tokens = [\"a-long-enough-token\"]\n";
        let (c, _) = ServerFile::parse(text)
            .and_then(ServerFile::into_server_config)
            .expect("parses");
        assert!(matches!(
            c.check(),
            Err(tscf_runtime_smol::StartError::PlainBeyondLoopback { .. })
        ));
        let (c, _) = ServerFile::parse(&format!("{text}allow_plain = true\n"))
            .and_then(ServerFile::into_server_config)
            .expect("parses");
        assert!(c.allow_plain_beyond_loopback);
        assert!(c.check().is_ok());
    }

    #[test]
    fn errors_name_the_key() {
        let e = ServerFile::parse("tpc = []").expect_err("unknown key");
        assert!(e.contains("tpc"), "{e}");
        let e = ServerFile::parse("udp = [\"nowhere\"]").expect_err("bad address");
        assert!(e.contains("udp"), "{e}");
        let e = ServerFile::parse("ipv4_pool = \"10.0.0.0\"").expect_err("bad pool");
        assert!(
            e.contains("ipv4_pool") && e.contains("network/prefix"),
            "{e}"
        );
    }

    /// A cluster CA and the certificate of director `dir-a` as PEM files in a directory of
    /// their own, removed on drop.
    struct ClusterFiles(PathBuf);

    impl ClusterFiles {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("tscf-config-{}-{tag}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a directory");
            let ca_key = rcgen::KeyPair::generate().expect("a key");
            let mut ca_params = rcgen::CertificateParams::new(vec![]).expect("no names");
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("a CA");
            let key = rcgen::KeyPair::generate().expect("a key");
            let cert = rcgen::CertificateParams::new(vec!["dir-a".to_owned()])
                .expect("a name")
                .signed_by(&key, &ca)
                .expect("a certificate");
            let write = |name: &str, text: String| {
                std::fs::write(dir.join(name), text).expect("written");
            };
            write("ca.pem", ca.pem());
            write("dir-a.pem", cert.pem());
            write("dir-a.key", key.serialize_pem());
            write("secret", format!("{}\n", "5a".repeat(32)));
            Self(dir)
        }

        /// A `[cluster]` table naming these files, with `extra` lines.
        fn table(&self, extra: &str) -> String {
            let path = |name: &str| self.0.join(name).display().to_string();
            format!(
                "udp = [\"127.0.0.1:0\"]\n[cluster]\nname = \"dir-a\"\n\
                 redis = \"redis://127.0.0.1:6379/\"\nmesh = \"127.0.0.1:4450\"\n\
                 ca = {:?}\ncert = {:?}\nkey = {:?}\n{extra}",
                path("ca.pem"),
                path("dir-a.pem"),
                path("dir-a.key"),
            )
        }

        fn secret_file(&self) -> String {
            format!(
                "secret_file = {:?}\n",
                self.0.join("secret").display().to_string()
            )
        }
    }

    impl Drop for ClusterFiles {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cluster_error(text: &str) -> String {
        ServerFile::parse(text)
            .and_then(ServerFile::into_server_config)
            .map(|_| ())
            .expect_err("refused")
    }

    #[test]
    fn a_cluster_table_makes_a_director_of_a_cluster() {
        let files = ClusterFiles::new("ok");
        let text = files.table(&format!(
            "{}advertise = \"192.0.2.10:4450\"\nheartbeat_ms = 500\ndirector_lease_ms = 2000\n",
            files.secret_file()
        ));
        let (config, endpoints) = ServerFile::parse(&text)
            .and_then(ServerFile::into_server_config)
            .expect("a cluster");
        let cluster = config.director.cluster.expect("a cluster");
        assert_eq!(cluster.name.as_str(), "dir-a");
        assert_eq!(cluster.secret, [0x5a; 32]);
        assert_eq!(
            cluster.mesh,
            "192.0.2.10:4450".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(cluster.heartbeat, Duration::from_millis(500));
        assert_eq!(cluster.director_lease, Duration::from_secs(2));
        assert!(endpoints.is_some());
        assert_eq!(
            config.mesh,
            vec!["127.0.0.1:4450".parse::<SocketAddr>().expect("addr")]
        );

        // The registry behind sentinels.
        let text = files.table(&files.secret_file()).replace(
            "redis://127.0.0.1:6379/",
            "redis+sentinel://:password@10.0.0.1,10.0.0.2:26380/mymaster",
        );
        let (_, endpoints) = ServerFile::parse(&text)
            .and_then(ServerFile::into_server_config)
            .expect("a cluster behind sentinels");
        assert!(endpoints.is_some());

        // Inline secret; advertised where it listens.
        let text = files.table(&format!("secret = \"{}\"\n", "0f".repeat(32)));
        let (config, _) = ServerFile::parse(&text)
            .and_then(ServerFile::into_server_config)
            .expect("a cluster");
        let cluster = config.director.cluster.expect("a cluster");
        assert_eq!(
            cluster.mesh,
            "127.0.0.1:4450".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(cluster.secret, [0x0f; 32]);
    }

    #[test]
    fn cluster_errors_name_the_key() {
        let files = ClusterFiles::new("errors");
        let secret = files.secret_file();
        let cases = [
            (
                files.table(&secret).replace("dir-a\"", "Dir_A\""),
                "cluster.name",
            ),
            (
                files.table(&secret).replace("dir-a\"", "-dir\""),
                "cluster.name",
            ),
            (files.table(""), "secret or secret_file"),
            (
                files.table(&format!("{secret}secret = \"{}\"\n", "0f".repeat(32))),
                "not both",
            ),
            (files.table("secret = \"abcd\"\n"), "cluster.secret"),
            (
                files.table(&format!("secret = \"{}\"\n", "0".repeat(64))),
                "cluster.secret",
            ),
            (
                files.table("secret_file = \"/nonexistent/secret\"\n"),
                "cluster.secret_file",
            ),
            (
                files.table(&format!("{secret}heartbeat_ms = 3000\n")),
                "cluster.director_lease_ms",
            ),
            (
                files.table(&format!("{secret}heartbeat_ms = 0\n")),
                "cluster.heartbeat_ms",
            ),
            (
                files
                    .table(&secret)
                    .replace("redis://127.0.0.1:6379/", "http://nowhere"),
                "cluster.redis",
            ),
            (
                files
                    .table(&secret)
                    .replace("redis://127.0.0.1:6379/", "redis+sentinel://10.0.0.1:26379"),
                "cluster.redis: registry URL \"redis+sentinel://10.0.0.1:26379\": no master name",
            ),
            (
                files
                    .table(&secret)
                    .replace("127.0.0.1:4450", "0.0.0.0:4450"),
                "cluster.advertise",
            ),
            (
                files.table(&format!("{secret}namespace = \"a{{b}}\"\n")),
                "cluster.namespace",
            ),
            (
                files.table(&secret).replace("dir-a.pem", "missing.pem"),
                "missing.pem",
            ),
            (files.table(&format!("{secret}peers = []\n")), "peers"),
            (files.table(&secret).replace("mesh = ", "# "), "mesh"),
        ];
        for (text, expected) in cases {
            let e = cluster_error(&text);
            assert!(e.contains(expected), "{expected:?} not in {e:?}");
        }
    }
}
