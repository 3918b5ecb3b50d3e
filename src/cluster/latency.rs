//! Simulated distance between regions, for running a geo-distributed cluster
//! on one host (`chatstore dev --geo`, the tests, `make bench-geo`).
//!
//! The config's `[latency]` table holds a round-trip time per region pair.
//! When `simulate = true`, every gRPC call a node makes to a peer and every
//! call a router makes to a node waits half the pair's round trip before it
//! is sent and half after its reply arrives ([`Delayed`]), so each call costs
//! one round trip between the two regions, as on a real WAN link. Calls
//! within a region, and anything when `simulate` is off, are not touched.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::{http, BoxFuture, Service};

use crate::cluster::ClusterConfig;

/// One-way delays between regions; empty when latency is not simulated.
#[derive(Clone, Debug, Default)]
pub struct LinkDelays {
    one_way: Arc<BTreeMap<(String, String), Duration>>,
}

impl LinkDelays {
    /// The delays the config asks to simulate (none unless
    /// `[latency] simulate = true`).
    pub fn from_config(config: &ClusterConfig) -> LinkDelays {
        if !config.latency.simulate {
            return LinkDelays::default();
        }
        let mut one_way = BTreeMap::new();
        for (a, b, rtt) in config.latency.pairs() {
            let d = Duration::from_micros(rtt * 500);
            one_way.insert((a.clone(), b.clone()), d);
            one_way.insert((b, a), d);
        }
        LinkDelays {
            one_way: Arc::new(one_way),
        }
    }

    /// The one-way delay from region `from` to region `to`.
    pub fn one_way(&self, from: &str, to: &str) -> Duration {
        if from == to {
            return Duration::ZERO;
        }
        self.one_way
            .get(&(from.to_string(), to.to_string()))
            .copied()
            .unwrap_or_default()
    }
}

/// A gRPC client transport that waits `one_way` before sending each request
/// and again after its response arrives.
#[derive(Clone, Debug)]
pub struct Delayed<S> {
    inner: S,
    one_way: Duration,
}

impl<S> Delayed<S> {
    pub fn new(inner: S, one_way: Duration) -> Delayed<S> {
        Delayed { inner, one_way }
    }
}

impl<S, B, R> Service<http::Request<B>> for Delayed<S>
where
    S: Service<http::Request<B>, Response = R> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Send + 'static,
{
    type Response = R;
    type Error = S::Error;
    type Future = BoxFuture<R, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The instance that was polled ready makes the call; a fresh clone
        // takes its place for the next one.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let one_way = self.one_way;
        if one_way.is_zero() {
            let call = ready.call(request);
            return Box::pin(call);
        }
        Box::pin(async move {
            tokio::time::sleep(one_way).await;
            let response = ready.call(request).await?;
            tokio::time::sleep(one_way).await;
            Ok(response)
        })
    }
}
