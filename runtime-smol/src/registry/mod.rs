//! The cluster's registry in Redis or Valkey (`docs/CLUSTER.md`): executes the core's
//! [`RegistryRequest`]s with the semantics of [`MemoryRegistry`], in order, each atomic on its
//! own (one command, one `MULTI`, or one script), several pipelined on one connection.
//!
//! Every key of a cluster sits under the one hash tag `tscf:{<namespace>}:`, so that a Redis
//! Cluster keeps them in one slot and the scripts may touch any of them. Leases are Redis's own
//! expiry (`PX`, `PEXPIRE`): no clock of this process goes into the store.
//!
//! | key | value | expiry |
//! | --- | --- | --- |
//! | `tscf:{ns}:director:<name>` | its mesh address, `ip:port` | its lease |
//! | `tscf:{ns}:directors` | the set of director names that wrote a heartbeat | none; names whose key expired are removed by the next heartbeat |
//! | `tscf:{ns}:tunnel:<id in hex>` | [`TunnelRecord::to_value`] | the tunnel's lease |
//! | `tscf:{ns}:address:<ip>` | [`AddressHolder::to_value`] | the claim's or tunnel's lease |
//!
//! The store is one server (`redis://`, `unix://`) or the master that Redis Sentinel names
//! (`redis+sentinel://`): asked again at every connection, so that the registry follows the
//! store's own failover.
//!
//! [`MemoryRegistry`]: tscf_core::cluster::MemoryRegistry

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, Script};
use tscf_core::cluster::{
    AddressHolder, DirectorName, RegistryRequest, RegistryResponse, TunnelRecord,
};

/// Renews a director's lease, then lists the directors whose lease runs, as name, mesh
/// address, name, mesh address, …, forgetting the names whose key expired.
///
/// KEYS: the director's key, the set of names. ARGV: name, mesh address, lease in ms, the
/// prefix of director keys.
const HEARTBEAT: &str = include_str!("heartbeat.lua");

/// Sets the expiry of each key whose value names the owner (it starts with `owner `).
///
/// KEYS: tunnel and address keys. ARGV: owner, lease in ms.
const RENEW: &str = include_str!("renew.lua");

/// Deletes each key whose value names the owner.
///
/// KEYS: the tunnel key and address keys. ARGV: owner.
const REMOVE: &str = include_str!("remove.lua");

/// The longest lease written, so that a huge [`Duration`] stays a valid expiry (ten years).
const MAX_LEASE_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// A cluster registry in Redis or Valkey.
///
/// It connects on the first request and again on the request after any failure; a request
/// that cannot be executed (the store is down, slow beyond the timeout, or answers with an
/// error) is answered with [`RegistryResponse::Failed`]. Behind sentinels, each connection
/// goes to the master they name then, so the request after a failover reaches the new one.
pub struct RedisRegistry {
    store: Store,
    prefix: String,
    timeout: Duration,
    connection: Option<MultiplexedConnection>,
    heartbeat: Script,
    renew: Script,
    remove: Script,
}

/// A registry URL that is not one.
#[derive(Debug, thiserror::Error)]
#[error("registry URL {url:?}: {reason}")]
pub struct BadRegistryUrl {
    url: String,
    reason: String,
}

impl RedisRegistry {
    /// How long connecting or one request may take by default before it fails.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

    /// A registry at `url`, keeping its keys under `tscf:{namespace}:`. Connects on the first
    /// request. The URL is one of
    ///
    /// - `redis://[user:password@]host:port/db` or `unix:///path`: one server;
    /// - `redis+sentinel://[user:password@]host:port,host:port,…/master[/db]`: the master
    ///   named `master` by the first of these sentinels that answers (port 26379 by default),
    ///   with the user, password and database for the master; the sentinels are asked without
    ///   a password.
    ///
    /// TLS to the store is not built in.
    pub fn new(url: &str, namespace: &str) -> Result<Self, BadRegistryUrl> {
        let store = Store::open(url).map_err(|reason| BadRegistryUrl {
            url: url.to_owned(),
            reason,
        })?;
        Ok(Self {
            store,
            prefix: format!("tscf:{{{namespace}}}:"),
            timeout: Self::DEFAULT_TIMEOUT,
            connection: None,
            heartbeat: Script::new(HEARTBEAT),
            renew: Script::new(RENEW),
            remove: Script::new(REMOVE),
        })
    }

    /// Sets how long connecting or one request may take before it fails.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        self.connection = None;
    }

    /// Executes `request`.
    pub async fn execute(&mut self, request: &RegistryRequest) -> RegistryResponse {
        let mut answers = self.execute_all(std::slice::from_ref(request)).await;
        answers
            .pop()
            .unwrap_or_else(|| RegistryResponse::Failed("no answer".to_owned()))
    }

    /// Executes `requests` in their order, pipelined on one connection (each is sent before
    /// the answer to the one before it is in), and answers each in the same order.
    pub async fn execute_all(&mut self, requests: &[RegistryRequest]) -> Vec<RegistryResponse> {
        let answers = match self.connection().await {
            Ok(con) => {
                let this = &*self;
                let each = requests.iter().map(|r| Box::pin(this.run(con.clone(), r)));
                in_order(each.collect()).await
            }
            Err(e) => requests.iter().map(|_| Err(e.clone())).collect(),
        };
        if answers.iter().any(Result::is_err) {
            // The connection may be broken or half-way through a reply: start afresh.
            self.connection = None;
        }
        answers
            .into_iter()
            .map(|answer| answer.unwrap_or_else(|e| RegistryResponse::Failed(e.to_string())))
            .collect()
    }

    /// Executes one request on `con`.
    async fn run(
        &self,
        mut con: MultiplexedConnection,
        request: &RegistryRequest,
    ) -> redis::RedisResult<RegistryResponse> {
        let prefix = &self.prefix;
        let response = match request {
            RegistryRequest::Heartbeat { name, mesh, lease } => {
                let flat: Vec<String> = self
                    .heartbeat
                    .key(director_key(prefix, name))
                    .key(format!("{prefix}directors"))
                    .arg(name.as_str())
                    .arg(mesh.to_string())
                    .arg(millis(*lease))
                    .arg(format!("{prefix}director:"))
                    .invoke_async(&mut con)
                    .await?;
                RegistryResponse::Directors(directors(&flat))
            }
            RegistryRequest::Claim { addr, owner, lease } => {
                let holder = AddressHolder {
                    owner: owner.clone(),
                    tunnel: 0,
                };
                let set: Option<String> = redis::cmd("SET")
                    .arg(address_key(prefix, addr))
                    .arg(holder.to_value())
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(*lease))
                    .query_async(&mut con)
                    .await?;
                RegistryResponse::Claimed(set.is_some())
            }
            RegistryRequest::Put { record, lease } => {
                let lease = millis(*lease);
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("SET")
                    .arg(tunnel_key(prefix, record.id))
                    .arg(record.to_value())
                    .arg("PX")
                    .arg(lease)
                    .ignore();
                let holder = AddressHolder {
                    owner: record.owner.clone(),
                    tunnel: record.id,
                };
                for addr in record.addresses() {
                    pipe.cmd("SET")
                        .arg(address_key(prefix, &addr))
                        .arg(holder.to_value())
                        .arg("PX")
                        .arg(lease)
                        .ignore();
                }
                pipe.query_async::<()>(&mut con).await?;
                RegistryResponse::Done
            }
            RegistryRequest::Renew {
                owner,
                tunnels,
                addresses,
                lease,
            } => {
                if !tunnels.is_empty() || !addresses.is_empty() {
                    let mut renew = self.renew.prepare_invoke();
                    for id in tunnels {
                        renew.key(tunnel_key(prefix, *id));
                    }
                    for addr in addresses {
                        renew.key(address_key(prefix, addr));
                    }
                    renew.arg(owner.as_str()).arg(millis(*lease));
                    renew.invoke_async::<()>(&mut con).await?;
                }
                RegistryResponse::Done
            }
            RegistryRequest::Remove {
                id,
                addresses,
                owner,
            } => {
                let mut remove = self.remove.key(tunnel_key(prefix, *id));
                for addr in addresses {
                    remove.key(address_key(prefix, addr));
                }
                remove.arg(owner.as_str());
                remove.invoke_async::<()>(&mut con).await?;
                RegistryResponse::Done
            }
            RegistryRequest::GetTunnel { id } => {
                let value: Option<String> = redis::cmd("GET")
                    .arg(tunnel_key(prefix, *id))
                    .query_async(&mut con)
                    .await?;
                match value.map(|v| TunnelRecord::from_value(*id, &v)) {
                    None => RegistryResponse::Tunnel(None),
                    Some(Some(record)) => RegistryResponse::Tunnel(Some(record)),
                    Some(None) => damaged(&tunnel_key(prefix, *id)),
                }
            }
            RegistryRequest::GetAddress { addr } => {
                let value: Option<String> = redis::cmd("GET")
                    .arg(address_key(prefix, addr))
                    .query_async(&mut con)
                    .await?;
                match value.map(|v| AddressHolder::from_value(&v)) {
                    None => RegistryResponse::Address(None),
                    Some(Some(holder)) => RegistryResponse::Address(Some(holder)),
                    Some(None) => damaged(&address_key(prefix, addr)),
                }
            }
            other => RegistryResponse::Failed(format!("request not supported: {other:?}")),
        };
        Ok(response)
    }

    /// The connection, made now if there is none.
    async fn connection(&mut self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(con) = &self.connection {
            return Ok(con.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let mut con = self.store.connect(&config).await?;
        // Loaded now, a script is never missing when requests are pipelined: a request that
        // had to load it would run after the ones sent behind it.
        for script in [&self.heartbeat, &self.renew, &self.remove] {
            script.load_async(&mut con).await?;
        }
        self.connection = Some(con.clone());
        Ok(con)
    }
}

/// Where the registry's store is.
enum Store {
    /// One server.
    Server(Client),
    /// The master the sentinels name at each connection.
    Sentinel(SentinelClient),
}

impl Store {
    /// The scheme of a URL that lists sentinels.
    const SENTINEL_SCHEME: &str = "redis+sentinel://";
    /// A sentinel's port when its address names none.
    const SENTINEL_PORT: u16 = 26379;

    /// The store `url` names, or why it names none.
    fn open(url: &str) -> Result<Self, String> {
        let Some(rest) = url.strip_prefix(Self::SENTINEL_SCHEME) else {
            return Client::open(url)
                .map(Store::Server)
                .map_err(|e| e.to_string());
        };
        let (authority, path) = rest.split_once('/').ok_or(
            "no master name after the sentinels: the form is \
             redis+sentinel://host:port,host:port/master",
        )?;
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
            None => (String::new(), authority),
        };
        let sentinels = hosts
            .split(',')
            .map(|host| {
                if host.is_empty() {
                    return Err("an empty sentinel address".to_owned());
                }
                let has_port = host.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']'));
                let addr = if has_port {
                    host.to_owned()
                } else {
                    format!("{host}:{}", Self::SENTINEL_PORT)
                };
                format!("redis://{addr}/")
                    .into_connection_info()
                    .map_err(|e| format!("sentinel {host:?} is not host:port: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let (master, db) = path.split_once('/').unwrap_or((path, ""));
        let named = !master.is_empty()
            && master
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"?#@,".contains(&b));
        if !named {
            return Err(format!(
                "master name {master:?}: printable ASCII without spaces or any of ?#@, is expected"
            ));
        }
        // The master's user, password and database, parsed as Redis parses its own URLs.
        let master_settings = format!("redis://{credentials}master/{db}")
            .into_connection_info()
            .map_err(|e| format!("the master's credentials or database {db:?}: {e}"))?
            .redis_settings()
            .clone();
        let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(master_settings);
        SentinelClient::build(
            sentinels,
            master.to_owned(),
            Some(node),
            SentinelServerType::Master,
        )
        .map(Store::Sentinel)
        .map_err(|e| e.to_string())
    }

    /// A new connection to the store: to the server, or to the master the sentinels name now.
    async fn connect(
        &mut self,
        config: &AsyncConnectionConfig,
    ) -> redis::RedisResult<MultiplexedConnection> {
        match self {
            Store::Server(client) => {
                client
                    .get_multiplexed_async_connection_with_config(config)
                    .await
            }
            Store::Sentinel(sentinels) => sentinels.get_async_connection_with_config(config).await,
        }
    }
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: name only the namespace.
        f.debug_struct("RedisRegistry")
            .field("prefix", &self.prefix)
            .field("connected", &self.connection.is_some())
            .finish_non_exhaustive()
    }
}

/// Runs `futures` side by side, polling each in turn from the first (so that each sends its
/// command before the next does), and gives their outputs in the same order.
async fn in_order<F: Future + Unpin>(mut futures: Vec<F>) -> Vec<F::Output> {
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match Pin::new(future).poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

fn director_key(prefix: &str, name: &DirectorName) -> String {
    format!("{prefix}director:{name}")
}

fn tunnel_key(prefix: &str, id: u64) -> String {
    format!("{prefix}tunnel:{id:x}")
}

fn address_key(prefix: &str, addr: &IpAddr) -> String {
    format!("{prefix}address:{addr}")
}

/// A lease in whole milliseconds, rounded up (Redis refuses an expiry of 0) and bounded.
fn millis(lease: Duration) -> u64 {
    let ms = lease.as_nanos().div_ceil(1_000_000).max(1);
    u64::try_from(ms).unwrap_or(u64::MAX).min(MAX_LEASE_MS)
}

/// The heartbeat script's answer as pairs, in name order like [`MemoryRegistry`]'s; pairs
/// that are not a director and an address (the store is shared or damaged) are left out.
///
/// [`MemoryRegistry`]: tscf_core::cluster::MemoryRegistry
fn directors(flat: &[String]) -> Vec<(DirectorName, SocketAddr)> {
    let mut alive: Vec<(DirectorName, SocketAddr)> = flat
        .chunks_exact(2)
        .filter_map(|pair| {
            let parsed = DirectorName::new(&pair[0])
                .ok()
                .zip(pair[1].parse::<SocketAddr>().ok());
            if parsed.is_none() {
                tracing::warn!(name = %pair[0], mesh = %pair[1], "registry: not a director");
            }
            parsed
        })
        .collect();
    alive.sort_by(|a, b| a.0.cmp(&b.0));
    alive
}

fn damaged(key: &str) -> RegistryResponse {
    RegistryResponse::Failed(format!("registry: {key} holds no value of tscf's"))
}

#[cfg(test)]
mod tests;
