//! What a server of a cluster runs beside its listeners (`docs/CLUSTER.md`): the registry
//! task and the mesh listeners, secured by the cluster's mutual TLS.
//!
//! The director asks for registry work with [`ServerEvent::Registry`]; the driver queues it
//! for the one registry task (a bounded queue: a request that finds it full is answered with
//! a failure at once), which executes the requests in order against [`RedisRegistry`], several
//! pipelined on one connection, and hands each answer back through the host's lock like any
//! other input.
//!
//! [`ServerEvent::Registry`]: tscf_core::server::ServerEvent::Registry

use std::sync::Arc;

use async_channel::{Receiver, Sender, TrySendError};
use tscf_core::cluster::{RegistryRequest, RegistryResponse, RequestId};
use tscf_core::server::ServerHost;
use tscf_core::tls::MeshTls;

use crate::drive::Shared;
use crate::server::ServerExtra;
use crate::RedisRegistry;

/// The registry and the mesh TLS of a director that is one of a cluster; the director's side
/// of it is [`DirectorConfig::cluster`](tscf_core::director::DirectorConfig::cluster), its mesh
/// listeners are [`ServerConfig::mesh`](tscf_core::server::ServerConfig::mesh).
#[derive(Debug)]
pub struct ClusterEndpoints {
    /// The registry the directors share.
    pub registry: RedisRegistry,
    /// The mesh's TLS: the mesh listeners present and verify with its server side, links to
    /// the other directors are dialed with its client side.
    pub mesh_tls: MeshTls,
    /// Registry requests waiting for the registry at most; beyond, a request is answered
    /// with a failure at once (default 1024).
    pub registry_queue: usize,
}

impl ClusterEndpoints {
    /// The endpoints with the default queue.
    pub fn new(registry: RedisRegistry, mesh_tls: MeshTls) -> Self {
        Self {
            registry,
            mesh_tls,
            registry_queue: 1024,
        }
    }
}

/// One registry request on its way to the registry task.
pub(crate) type Queued = (RequestId, RegistryRequest);

/// The queue to the registry task, and its other end.
pub(crate) fn queue(bound: usize) -> (Sender<Queued>, Receiver<Queued>) {
    async_channel::bounded(bound.max(1))
}

/// Hands request `id` to the registry task through `queue`, or answers it with a failure at
/// once when there is no registry or its queue is full.
pub(crate) fn submit(
    queue: Option<&Sender<Queued>>,
    host: &mut ServerHost,
    now: std::time::Instant,
    id: RequestId,
    request: RegistryRequest,
) {
    let refused = match queue.map(|q| q.try_send((id, request))) {
        Some(Ok(())) => return,
        Some(Err(TrySendError::Full(_))) => "registry queue full",
        Some(Err(TrySendError::Closed(_))) => "registry stopped",
        None => "no registry configured",
    };
    host.handle_registry(now, id, RegistryResponse::Failed(refused.to_owned()));
}

/// The registry task's body: executes the queued requests in order, up to [`PIPELINE`] of
/// them at a time pipelined on the registry's connection, and hands their answers back to the
/// host under one lock.
pub(crate) async fn run_registry(
    shared: Arc<Shared<ServerExtra>>,
    queue: Receiver<Queued>,
    mut registry: RedisRegistry,
) {
    let mut ids = Vec::with_capacity(PIPELINE);
    let mut requests = Vec::with_capacity(PIPELINE);
    while let Ok((id, request)) = queue.recv().await {
        ids.push(id);
        requests.push(request);
        while requests.len() < PIPELINE {
            let Ok((id, request)) = queue.try_recv() else {
                break;
            };
            ids.push(id);
            requests.push(request);
        }
        let answers = registry.execute_all(&requests).await;
        requests.clear();
        let stopped = shared.drive(|host, io, now| {
            if !io.stopped {
                for (id, answer) in ids.drain(..).zip(answers) {
                    host.handle_registry(now, id, answer);
                }
            }
            io.stopped
        });
        ids.clear();
        if stopped {
            return;
        }
    }
}

/// Registry requests sent at most before the first of them is answered.
const PIPELINE: usize = 32;

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tscf_core::cluster::{ClusterConfig, DirectorName};
    use tscf_core::server::{LocalAddrs, ServerConfig, ServerEvent};

    use super::*;

    /// A director of a cluster, and the registry requests it asked for at start.
    fn director(now: Instant) -> (ServerHost, Vec<Queued>) {
        let name = DirectorName::new("dir-a").expect("a name");
        let mesh = "127.0.0.1:4450".parse().expect("an address");
        let mut config = ServerConfig::default();
        config.director.cluster = Some(ClusterConfig::new(name, [7; 32], mesh));
        let local = LocalAddrs {
            udp: vec!["127.0.0.1:4440".parse().expect("an address")],
            ..LocalAddrs::default()
        };
        let mut host = ServerHost::new(config, &local, None, now).expect("a host");
        let mut requests = Vec::new();
        while let Some(event) = host.poll_event() {
            if let ServerEvent::Registry { id, request } = event {
                requests.push((id, request));
            }
        }
        (host, requests)
    }

    #[test]
    fn a_request_that_finds_the_queue_full_or_no_registry_fails_at_once() {
        let now = Instant::now();
        let (mut host, requests) = director(now);
        assert!(requests.len() >= 3, "{requests:?}");
        let failures = |host: &ServerHost| host.stats().director.cluster.registry_failures;
        let (queue, taken) = queue(1);
        let mut requests = requests.into_iter();
        let (id, request) = requests.next().expect("a request");
        submit(Some(&queue), &mut host, now, id, request);
        assert_eq!((taken.len(), failures(&host)), (1, 0));

        let (id, request) = requests.next().expect("a request");
        submit(Some(&queue), &mut host, now, id, request);
        assert_eq!((taken.len(), failures(&host)), (1, 1));

        let (id, request) = requests.next().expect("a request");
        submit(None, &mut host, now, id, request);
        assert_eq!(failures(&host), 2);
    }
}
