//! TLS with certificate files that are read again while the process runs.
//!
//! [`Tls`] holds the rustls configurations built from a CA bundle and,
//! for nodes, routers and an admin's chatctl, a certificate and its key.
//! [`Tls::watch`] reads the files again every [`super::FILES_CHECKED_EVERY`];
//! every connection accepted ([`Tls::incoming`]) or made ([`Tls::connector`])
//! after that uses what it read, so certificates and CAs rotate without a
//! restart. Connections already open keep the certificates they were made
//! with. Files that do not parse, a key that does not belong to its
//! certificate, or a node's or router's certificate its peers would refuse
//! (not from a CA of the bundle, out of its validity, not for client and
//! server use, or without the process's names) are reported and change
//! nothing.
//!
//! Servers and clients do TLS here rather than through tonic's
//! `tls_config`, which builds its rustls configuration once.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use futures::{Stream, StreamExt as _};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tonic::codegen::http::Uri;

/// Longest a server waits for a client to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshaken connections waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 64;
/// Most TLS handshakes under way at once; more connections wait to be
/// accepted.
const HANDSHAKES_MAX: usize = 1024;
/// Most TLS handshakes under way at once from one address while half the
/// slots above are taken; a connection past it is closed at once. Without
/// it, connections that never finish a handshake, from one host, could hold
/// every slot and keep peers, routers and operators from connecting. Below
/// that pressure any number may come from one address (clients behind one
/// proxy or NAT reconnecting together).
const HANDSHAKES_PER_SOURCE_MAX: usize = 64;

/// The bounds on TLS handshakes a server runs.
#[derive(Clone, Copy)]
struct HandshakeLimits {
    total: usize,
    per_source: usize,
    timeout: Duration,
}

const HANDSHAKE_LIMITS: HandshakeLimits = HandshakeLimits {
    total: HANDSHAKES_MAX,
    per_source: HANDSHAKES_PER_SOURCE_MAX,
    timeout: HANDSHAKE_TIMEOUT,
};

/// A connection that can tell where it comes from.
pub trait RemoteIp {
    fn remote_ip(&self) -> Option<std::net::IpAddr>;
}

impl RemoteIp for TcpStream {
    fn remote_ip(&self) -> Option<std::net::IpAddr> {
        self.peer_addr().ok().map(|a| a.ip())
    }
}

/// Handshakes under way per source address.
#[derive(Default)]
struct Sources(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl Sources {
    /// Counts one more handshake from `ip`, unless `bound` is given and
    /// `ip` has that many under way.
    fn take(
        self: &Arc<Self>,
        ip: Option<std::net::IpAddr>,
        bound: Option<usize>,
    ) -> Option<SourceSlot> {
        let Some(ip) = ip.map(source_of) else {
            return Some(SourceSlot(None));
        };
        let mut counts = self.0.lock().expect("handshake sources");
        let n = counts.entry(ip).or_default();
        if bound.is_some_and(|bound| *n >= bound) {
            return None;
        }
        *n += 1;
        Some(SourceSlot(Some((self.clone(), ip))))
    }
}

/// The source a connection from `ip` counts against: an IPv6 address by its
/// /64 (one host may hold a whole /64), an IPv4 address as it is.
pub(crate) fn source_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// One handshake counted against its source until dropped.
struct SourceSlot(Option<(Arc<Sources>, std::net::IpAddr)>);

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Some((sources, ip)) = self.0.take() {
            let mut counts = sources.0.lock().expect("handshake sources");
            if let Some(n) = counts.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&ip);
                }
            }
        }
    }
}

/// Where one process's TLS comes from.
#[derive(Debug)]
struct Files {
    /// The CA bundle: every certificate in it is trusted (several during a
    /// CA rotation).
    ca: PathBuf,
    /// This process's certificate chain and key, if it has one.
    identity: Option<Identity>,
}

/// A process's certificate chain and key files, and the names the
/// certificate must carry.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The DNS names peers check the certificate for when this process
    /// serves (nodes and routers: the chain is checked against the CA
    /// bundle for client and server use, and for these names). None for
    /// chatctl's certificate, which is not checked here: the nodes judge it
    /// by their own bundle, and an operator must still be able to run
    /// `chatctl certs` with an expired one.
    pub names: Option<Vec<String>>,
}

/// What the files held when last read, and the configurations built from
/// them.
struct Loaded {
    bytes: Vec<Vec<u8>>,
    client: Arc<ClientConfig>,
    /// Requires a client certificate from the CA (nodes).
    mutual_server: Option<Arc<ServerConfig>>,
    /// Takes callers without certificates (routers' public API).
    server: Option<Arc<ServerConfig>>,
}

/// One process's TLS. Clones share it.
#[derive(Clone)]
pub struct Tls {
    files: Arc<Files>,
    current: Arc<RwLock<Arc<Loaded>>>,
    /// Files read that differ from those in use, taken if the next read
    /// finds them the same (not a rotation caught half-written).
    seen: Arc<std::sync::Mutex<Option<Vec<Vec<u8>>>>>,
}

/// Which server configuration [`Tls::incoming`] accepts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate from the CA.
    Required,
    /// Clients need no certificate.
    None,
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(pem: &[u8], path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// Refuses a certificate chain its peers would refuse: the leaf must chain
/// to a CA of `ca` through the rest of `chain`, be valid now, be for client
/// and server use, and carry each of `names`.
fn check_own(
    chain: &[CertificateDer<'static>],
    ca: &[CertificateDer<'static>],
    names: &[String],
) -> anyhow::Result<()> {
    let leaf = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| anyhow!("its first certificate does not parse: {e}"))?;
    let anchors = ca
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("a CA certificate does not parse: {e}"))?;
    let usages = [
        ("client", webpki::KeyUsage::client_auth()),
        ("server", webpki::KeyUsage::server_auth()),
    ];
    for (what, usage) in usages {
        leaf.verify_for_usage(
            provider().signature_verification_algorithms.all,
            &anchors,
            &chain[1..],
            rustls::pki_types::UnixTime::now(),
            usage,
            None,
            None,
        )
        .map_err(|e| {
            anyhow!("it does not verify against the CA bundle for {what} use ({e}); peers would refuse it")
        })?;
    }
    for name in names {
        let server_name = ServerName::try_from(name.as_str())
            .map_err(|e| anyhow!("{name:?} is not a DNS name: {e}"))?;
        leaf.verify_is_valid_for_subject_name(&server_name)
            .map_err(|_| anyhow!("it does not carry the name {name}; peers would refuse it"))?;
    }
    Ok(())
}

/// The configurations of `bytes` (the CA bundle, then the certificate and
/// key if any).
fn build(files: &Files, bytes: Vec<Vec<u8>>) -> anyhow::Result<Loaded> {
    let ca_certs = certificates(&bytes[0], &files.ca)?;
    let mut roots = RootCertStore::empty();
    for cert in ca_certs.iter().cloned() {
        roots
            .add(cert)
            .with_context(|| format!("a CA certificate in {}", files.ca.display()))?;
    }
    let roots = Arc::new(roots);
    let identity = match &files.identity {
        Some(Identity { cert, key, names }) => {
            let chain = certificates(&bytes[1], cert)?;
            if let Some(names) = names {
                check_own(&chain, &ca_certs, names).with_context(|| {
                    format!(
                        "the certificate in {} (CA bundle {})",
                        cert.display(),
                        files.ca.display()
                    )
                })?;
            }
            let key_der = PrivateKeyDer::from_pem_slice(&bytes[2])
                .map_err(|e| anyhow!("{}: {e}", key.display()))?;
            Some((chain, key_der, cert, key))
        }
        None => None,
    };
    let h2 = || vec![b"h2".to_vec()];
    let client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.clone());
    let mut client = match &identity {
        Some((chain, key_der, cert, key)) => client
            .with_client_auth_cert(chain.clone(), key_der.clone_key())
            .with_context(|| format!("{} with {}", cert.display(), key.display()))?,
        None => client.with_no_client_auth(),
    };
    client.alpn_protocols = h2();
    let (mutual_server, server) = match identity {
        Some((chain, key_der, cert, key)) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .context("client certificate verifier")?;
            let what = || format!("{} with {}", cert.display(), key.display());
            let mut mutual = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain.clone(), key_der.clone_key())
                .with_context(what)?;
            mutual.alpn_protocols = h2();
            let mut open = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain, key_der)
                .with_context(what)?;
            open.alpn_protocols = h2();
            (Some(Arc::new(mutual)), Some(Arc::new(open)))
        }
        None => (None, None),
    };
    Ok(Loaded {
        bytes,
        client: Arc::new(client),
        mutual_server,
        server,
    })
}

impl Files {
    fn read_all(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut bytes = vec![read(&self.ca)?];
        if let Some(Identity { cert, key, .. }) = &self.identity {
            bytes.push(read(cert)?);
            bytes.push(read(key)?);
        }
        Ok(bytes)
    }
}

impl Tls {
    /// Reads the CA bundle at `ca` and, if given, this process's
    /// certificate chain and key.
    pub fn load(ca: PathBuf, identity: Option<Identity>) -> anyhow::Result<Tls> {
        if let Some(Identity { key, .. }) = &identity {
            super::warn_if_exposed(key, "a private key");
        }
        let files = Files { ca, identity };
        let loaded = build(&files, files.read_all()?)?;
        Ok(Tls {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(Arc::new(loaded))),
            seen: Default::default(),
        })
    }

    fn current(&self) -> Arc<Loaded> {
        self.current.read().expect("TLS lock").clone()
    }

    /// Reads the files again and uses them from now on if they changed, are
    /// valid and read the same as at the previous reload (true if they
    /// changed): a CA bundle or chain read while it was being rewritten may
    /// parse yet lack a certificate. On an error what is in use stays.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let mut seen = self.seen.lock().expect("TLS files seen");
        let read = self.files.read_all();
        let bytes = match read {
            Ok(bytes) if self.current().bytes != bytes => bytes,
            other => {
                *seen = None;
                return other.map(|_| false);
            }
        };
        let loaded = build(&self.files, bytes.clone());
        let loaded = match loaded {
            Ok(loaded) if seen.as_ref() == Some(&bytes) => loaded,
            Ok(_) => {
                *seen = Some(bytes);
                return Ok(false);
            }
            Err(e) => {
                *seen = None;
                return Err(e);
            }
        };
        *seen = None;
        *self.current.write().expect("TLS lock") = Arc::new(loaded);
        Ok(true)
    }

    /// Reads the files again every [`super::FILES_CHECKED_EVERY`] while any
    /// clone of this lives.
    pub fn watch(&self) {
        let current = Arc::downgrade(&self.current);
        let (files, seen) = (self.files.clone(), self.seen.clone());
        super::watch_files(
            "TLS files",
            "new connections use them",
            "the certificates in use stay",
            move || {
                let current = current.upgrade()?;
                let live = Tls {
                    files: files.clone(),
                    current,
                    seen: seen.clone(),
                };
                Some(live.reload())
            },
        );
    }

    /// `conns` after a TLS handshake each, with the server configuration
    /// current when each connection arrived. Handshakes run side by side (at
    /// most [`HANDSHAKES_MAX`], and [`HANDSHAKES_PER_SOURCE_MAX`] from one
    /// address), so a slow client holds up no one else; one that fails or
    /// takes longer than [`HANDSHAKE_TIMEOUT`] is dropped.
    /// Errors of `conns` pass through. Needs a certificate.
    pub fn incoming<IO, S>(
        &self,
        auth: ClientAuth,
        conns: S,
    ) -> anyhow::Result<
        impl Stream<Item = io::Result<tokio_rustls::server::TlsStream<IO>>> + Send + 'static,
    >
    where
        S: Stream<Item = io::Result<IO>> + Send + 'static,
        IO: AsyncRead + AsyncWrite + RemoteIp + Unpin + Send + 'static,
    {
        self.incoming_with(auth, conns, HANDSHAKE_LIMITS)
    }

    fn incoming_with<IO, S>(
        &self,
        auth: ClientAuth,
        conns: S,
        limits: HandshakeLimits,
    ) -> anyhow::Result<
        impl Stream<Item = io::Result<tokio_rustls::server::TlsStream<IO>>> + Send + 'static,
    >
    where
        S: Stream<Item = io::Result<IO>> + Send + 'static,
        IO: AsyncRead + AsyncWrite + RemoteIp + Unpin + Send + 'static,
    {
        if self.files.identity.is_none() {
            bail!("a TLS server needs a certificate and key");
        }
        let tls = self.clone();
        let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.total));
        let sources = Arc::new(Sources::default());
        tokio::spawn(async move {
            let mut conns = std::pin::pin!(conns);
            loop {
                let slot = tokio::select! {
                    s = handshakes.clone().acquire_owned() => s.expect("never closed"),
                    _ = tx.closed() => return,
                };
                let conn = tokio::select! {
                    c = conns.next() => c,
                    _ = tx.closed() => return,
                };
                let io = match conn {
                    None => return,
                    Some(Err(e)) => {
                        if tx.send(Err(e)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Some(Ok(io)) => io,
                };
                let pressed = handshakes.available_permits() < limits.total / 2;
                let bound = pressed.then_some(limits.per_source);
                let Some(source) = sources.take(io.remote_ip(), bound) else {
                    tracing::debug!(
                        source = ?io.remote_ip(),
                        "too many TLS handshakes from one address; connection closed"
                    );
                    continue;
                };
                let loaded = tls.current();
                let config = match auth {
                    ClientAuth::Required => loaded.mutual_server.clone(),
                    ClientAuth::None => loaded.server.clone(),
                }
                .expect("a TLS server has a certificate");
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = (slot, source);
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(limits.timeout, acceptor.accept(io)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// Connects channels over TLS to a server whose certificate names
    /// `server_name`, with the client configuration current at each
    /// connection. The channel's URI takes the scheme `http`: the TLS is
    /// this connector's.
    pub fn connector(&self, server_name: &str) -> anyhow::Result<Connector> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| anyhow!("{server_name:?} is not a TLS server name: {e}"))?;
        Ok(Connector {
            tls: self.clone(),
            server_name,
        })
    }
}

/// Makes the TCP connections of a tonic channel and does TLS on them
/// ([`Tls::connector`]).
#[derive(Clone)]
pub struct Connector {
    tls: Tls,
    server_name: ServerName<'static>,
}

impl tonic::codegen::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.tls.current().client.clone();
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
                .ok_or_else(|| io::Error::other(format!("no host in {uri}")))?;
            let port = uri
                .port_u16()
                .ok_or_else(|| io::Error::other(format!("no port in {uri}")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(io::Error::other(format!(
                    "{uri}: the server did not agree on HTTP/2 (ALPN h2)"
                )));
            }
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Handshakes count against an IPv6 source by its /64, and an IPv4
    /// address written as IPv6 as the IPv4 address.
    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(source_of(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source_of(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_of(ip("2001:db8:1:2:bbbb::9")),
            source_of(ip("2001:db8:1:2::77"))
        );
        assert_ne!(source_of(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
    }

    /// A CA and a certificate for `name` signed by it, as PEM.
    fn issue(name: &str) -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &ca_cert, &ca_key)
            .unwrap();
        (ca_cert.pem(), leaf.pem(), key.serialize_pem())
    }

    /// A router's identity from `cert` and `key`.
    fn router(cert: PathBuf, key: PathBuf) -> Identity {
        Identity {
            cert,
            key,
            names: Some(vec!["router.chatstore".to_string()]),
        }
    }

    /// A router's TLS from files of a new CA written into `dir`, and the
    /// path of the CA file.
    fn router_tls(dir: &Path) -> (PathBuf, Tls) {
        let (ca_pem, cert_pem, key_pem) = issue("router.chatstore");
        let ca = write(dir, "ca.pem", &ca_pem);
        let cert = write(dir, "router.pem", &cert_pem);
        let key = write(dir, "router.key", &key_pem);
        let tls = Tls::load(ca.clone(), Some(router(cert, key))).unwrap();
        (ca, tls)
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A server and a client over loopback: whether a handshake from a
    /// client trusting `client_ca` succeeds.
    async fn handshake(server: &Tls, client_ca: &Path, name: &str) -> bool {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = tonic::transport::server::TcpIncoming::from(listener);
        // Handshakes run in tasks of their own; the stream only hands
        // over the finished ones.
        let accepted = server.incoming(ClientAuth::None, conns).unwrap();
        let client = Tls::load(client_ca.to_path_buf(), None).unwrap();
        let mut connector = client.connector(name).unwrap();
        let uri: Uri = format!("http://{addr}").parse().unwrap();
        let made = tonic::codegen::Service::call(&mut connector, uri).await;
        drop(accepted);
        made.is_ok()
    }

    /// A call on the router's public listener finds its connection (peer
    /// address and trust mark) in its extensions, over TLS and without.
    #[tokio::test]
    async fn calls_find_their_public_connection_with_and_without_tls() {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let tmp = tempfile::tempdir().unwrap();
        let (ca, server_tls) = router_tls(tmp.path());
        for tls in [None, Some(server_tls)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let seen = Arc::new(std::sync::Mutex::new(None));
            let (_reporter, health) = tonic_health::server::health_reporter();
            let health = tonic::service::interceptor::InterceptedService::new(health, {
                let seen = seen.clone();
                move |request: tonic::Request<()>| {
                    let connection = crate::api::http2::connection_of(&request);
                    *seen.lock().unwrap() = Some(connection.and_then(|c| c.remote_addr()));
                    Ok(request)
                }
            });
            let incoming = crate::api::http2::incoming(listener);
            let routes = tonic::transport::Server::builder().add_service(health);
            let server = match &tls {
                Some(tls) => {
                    let incoming = tls.incoming(ClientAuth::None, incoming).unwrap();
                    tokio::spawn(routes.serve_with_incoming(incoming))
                }
                None => tokio::spawn(routes.serve_with_incoming(incoming)),
            };
            let endpoint = crate::security::endpoint(&addr.to_string()).unwrap();
            let client_tls = tls.map(|_| Tls::load(ca.clone(), None).unwrap());
            let channel =
                crate::security::connect(endpoint, client_tls.as_ref(), "router.chatstore")
                    .await
                    .unwrap();
            let answer = HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await;
            assert!(answer.is_ok(), "{answer:?}");
            let peer = seen.lock().unwrap().take().expect("the call was seen");
            let tls_used = client_tls.is_some();
            assert_eq!(
                peer.map(|a| a.ip()),
                Some([127, 0, 0, 1].into()),
                "TLS {tls_used}"
            );
            server.abort();
        }
    }

    /// Connections from one address that never finish their handshake hold
    /// at most their share of the slots once half are taken: past it the
    /// next is closed at once, and a client from another address still gets
    /// through.
    #[tokio::test]
    async fn stalled_handshakes_from_one_address_lock_no_one_else_out() {
        let tmp = tempfile::tempdir().unwrap();
        let (ca, server) = router_tls(tmp.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = tonic::transport::server::TcpIncoming::from(listener);
        let limits = HandshakeLimits {
            total: 16,
            per_source: 4,
            timeout: Duration::from_secs(30),
        };
        let accepted = server
            .incoming_with(ClientAuth::None, conns, limits)
            .unwrap();
        let from_other = |n: usize| async move {
            let mut stalled = Vec::new();
            for _ in 0..n {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                stalled.push(socket.connect(addr).await.unwrap());
            }
            stalled
        };
        // Below the pressure mark one address may hold more than its share.
        let mut stalled = from_other(limits.total / 2).await;
        let mut one_more = from_other(1).await.pop().unwrap();
        // The one past the bound is closed without a handshake.
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::io::AsyncReadExt::read(&mut one_more, &mut byte),
        )
        .await
        .expect("closed at once, not left to the handshake timeout");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        // Another address still completes its handshake.
        let client = Tls::load(ca, None).unwrap();
        let mut connector = client.connector("router.chatstore").unwrap();
        let uri: Uri = format!("http://{addr}").parse().unwrap();
        let made = tokio::time::timeout(
            Duration::from_secs(3),
            tonic::codegen::Service::call(&mut connector, uri),
        )
        .await
        .expect("a handshake from another address does not wait");
        assert!(made.is_ok());
        stalled.clear();
        drop(accepted);
    }

    #[tokio::test]
    async fn new_files_take_effect_and_bad_ones_change_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (ca1, cert1, key1) = issue("router.chatstore");
        let (ca2, cert2, key2) = issue("router.chatstore");
        let ca = write(dir, "ca.pem", &ca1);
        let cert = write(dir, "router.pem", &cert1);
        let key = write(dir, "router.key", &key1);
        let only1 = write(dir, "only1.pem", &ca1);
        let only2 = write(dir, "only2.pem", &ca2);
        let server = Tls::load(ca.clone(), Some(router(cert.clone(), key.clone()))).unwrap();
        assert!(handshake(&server, &only1, "router.chatstore").await);
        assert!(!handshake(&server, &only2, "router.chatstore").await);
        assert!(!handshake(&server, &only1, "node-1.chatstore").await);
        assert!(!server.reload().unwrap(), "nothing changed");

        // A key that is not the certificate's: refused, the old pair stays.
        write(dir, "router.key", &key2);
        let e = server.reload().unwrap_err();
        assert!(format!("{e:#}").contains("router.key"), "{e:#}");
        assert!(handshake(&server, &only1, "router.chatstore").await);
        write(dir, "router.key", &key1);
        // A CA file that is not PEM: refused too.
        write(dir, "ca.pem", "not a certificate");
        let e = server.reload().unwrap_err();
        assert!(format!("{e:#}").contains("no PEM certificate"), "{e:#}");
        assert!(handshake(&server, &only1, "router.chatstore").await);

        // A new pair whose CA the bundle lacks, or that lacks the
        // router's name: refused on each read, the old pair stays.
        let (ca3, cert3, key3) = issue("node-1.chatstore");
        for (bundle, cert, key, why) in [
            (
                ca1.clone(),
                &cert2,
                &key2,
                "does not verify against the CA bundle",
            ),
            (
                format!("{ca1}{ca3}"),
                &cert3,
                &key3,
                "does not carry the name router.chatstore",
            ),
        ] {
            write(dir, "ca.pem", &bundle);
            write(dir, "router.pem", cert);
            write(dir, "router.key", key);
            for _ in 0..2 {
                let e = server.reload().unwrap_err();
                assert!(format!("{e:#}").contains(why), "{e:#}");
            }
            assert!(handshake(&server, &only1, "router.chatstore").await);
        }
        // At start too.
        assert!(Tls::load(ca.clone(), Some(router(cert.clone(), key.clone()))).is_err());
        write(dir, "ca.pem", &ca1);
        write(dir, "router.pem", &cert1);
        write(dir, "router.key", &key1);
        assert!(!server.reload().unwrap(), "the files in use again");

        // The new pair and a bundle of both CAs: new connections get the
        // new certificate.
        write(dir, "ca.pem", &format!("{ca1}{ca2}"));
        write(dir, "router.pem", &cert2);
        write(dir, "router.key", &key2);
        assert!(!server.reload().unwrap(), "read once: not yet taken");
        assert!(handshake(&server, &only1, "router.chatstore").await);
        assert!(server.reload().unwrap(), "read the same twice: taken");
        assert!(handshake(&server, &only2, "router.chatstore").await);
        assert!(!handshake(&server, &only1, "router.chatstore").await);
    }
}
