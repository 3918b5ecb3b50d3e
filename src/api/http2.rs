//! HTTP/2 settings shared by every gRPC server and client here.
//!
//! h2's defaults (64 KiB flow-control windows, 16 KiB frames) make a 50 KiB
//! history page or a 96 KiB Raft entry wait for window updates between
//! frames on a busy connection. Larger windows let a whole message go out at
//! once; they grant the peer permission to send, not memory up front.
//!
//! The router's public server also gathers the responses that become ready
//! together into one socket write ([`CoalescedWrites`]).

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tonic::transport::{Endpoint, Server};

/// Flow-control window of one stream (one call). Every AppendEntries from
/// one node to another, and every write from a router to a node, travels
/// on one long-lived stream (`api::mux`): at most a window per round trip
/// goes, so 8 MiB carries 40 MiB/s over a 200 ms round trip between
/// regions (2 MiB carried 10, and a follower catching up on many shards
/// timed its calls out). A mux batch is at most 4 MiB, within it.
pub const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
/// Flow-control window of a connection, shared by its streams.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;
/// Largest HTTP/2 frame accepted.
pub const FRAME_BYTES_MAX: u32 = 256 * 1024;

/// A client endpoint with the shared settings.
pub fn endpoint(e: Endpoint) -> Endpoint {
    e.initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(FRAME_BYTES_MAX)
}

/// How often a server pings a connection's peer.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is closed, and
/// with it every stream on it (a Watch from a client host that died without
/// closing its socket would otherwise poll for it forever).
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A server builder with the shared settings.
pub fn server<L>(s: Server<L>) -> Server<L> {
    s.initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(FRAME_BYTES_MAX)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// Connections a public listener holds open at once.
const CONNECTIONS_MAX: usize = 16_384;
/// Connections it holds from one source (an IPv4 address or IPv6 /64).
const CONNECTIONS_PER_SOURCE_MAX: usize = 1_024;
/// How long a listener waits after a failed accept (out of file
/// descriptors: trying again at once would spin).
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
/// How long a public connection stays open until a call on it passes the
/// token check ([`PublicConnectInfo::trust`]); then for as long as its peer
/// keeps it. Without it, connections that send nothing (or only health
/// checks) after their handshake would hold the bounds above for ever.
const UNTRUSTED_TIME_MAX: Duration = Duration::from_secs(60);

/// The open connections of one listener, per source.
#[derive(Default)]
struct Connections {
    /// All open connections, and those of each source.
    counts: Mutex<(usize, HashMap<Option<IpAddr>, usize>)>,
}

/// What each call on a public connection finds in its extensions (inside
/// `TlsConnectInfo` over TLS; see [`connection_of`]): the connection's TCP
/// addresses, and its trust mark.
#[derive(Clone, Debug)]
pub struct PublicConnectInfo {
    tcp: tonic::transport::server::TcpConnectInfo,
    trusted: Option<Arc<AtomicBool>>,
}

impl PublicConnectInfo {
    /// The peer's address.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.tcp.remote_addr()
    }

    /// A call on this connection passed the token check: the connection
    /// stays open past [`UNTRUSTED_TIME_MAX`].
    pub fn trust(&self) {
        if let Some(trusted) = &self.trusted {
            trusted.store(true, Ordering::Relaxed);
        }
    }
}

/// The public connection `request` came on, with or without TLS.
pub fn connection_of<T>(request: &tonic::Request<T>) -> Option<&PublicConnectInfo> {
    let extensions = request.extensions();
    extensions.get::<PublicConnectInfo>().or_else(|| {
        extensions
            .get::<tonic::transport::server::TlsConnectInfo<PublicConnectInfo>>()
            .map(|tls| tls.get_ref())
    })
}

impl Connections {
    /// Counts one more connection from `source`, unless the listener holds
    /// `total_max` or the source `per_source_max` already.
    fn take(
        self: &Arc<Self>,
        source: Option<IpAddr>,
        (total_max, per_source_max): (usize, usize),
    ) -> Option<ConnectionSlot> {
        let mut counts = self.counts.lock().expect("connection counts");
        let (total, by_source) = &mut *counts;
        let from_source = by_source.get(&source).copied().unwrap_or(0);
        if *total >= total_max || from_source >= per_source_max {
            return None;
        }
        *total += 1;
        *by_source.entry(source).or_default() += 1;
        Some(ConnectionSlot {
            connections: self.clone(),
            source,
            trusted: Arc::default(),
        })
    }
}

/// One open connection, counted until dropped.
pub struct ConnectionSlot {
    connections: Arc<Connections>,
    source: Option<IpAddr>,
    /// Set once a call on the connection passed the token check.
    trusted: Arc<AtomicBool>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.connections.counts.lock().expect("connection counts");
        let (total, by_source) = &mut *counts;
        if let Some(n) = by_source.get_mut(&self.source) {
            *total -= 1;
            *n -= 1;
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// A public server's accepted connections: `TCP_NODELAY` set, writes
/// coalesced by [`CoalescedWrites`], at most [`CONNECTIONS_MAX`] open at
/// once and [`CONNECTIONS_PER_SOURCE_MAX`] from one source (one more is
/// closed at once), each closed [`UNTRUSTED_TIME_MAX`] after it opened
/// unless a call on it was marked ([`PublicConnectInfo::trust`]).
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = io::Result<CoalescedWrites<tokio::net::TcpStream>>> + Unpin {
    incoming_within(
        listener,
        (CONNECTIONS_MAX, CONNECTIONS_PER_SOURCE_MAX),
        UNTRUSTED_TIME_MAX,
    )
}

fn incoming_within(
    listener: tokio::net::TcpListener,
    limits: (usize, usize),
    untrusted_time: Duration,
) -> impl futures::Stream<Item = io::Result<CoalescedWrites<tokio::net::TcpStream>>> + Unpin {
    use futures::StreamExt as _;
    let connections = Arc::new(Connections::default());
    // The builder's tcp_nodelay only reaches listeners tonic binds itself;
    // accepted sockets get it here, or Nagle holds back small replies.
    let accepted = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(KEEPALIVE_INTERVAL));
    Box::pin(accepted.filter_map(move |conn| {
        let connections = connections.clone();
        async move {
            let stream = match conn {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    return Some(Err(e));
                }
            };
            let source = stream
                .peer_addr()
                .ok()
                .map(|a| crate::security::tls::source_of(a.ip()));
            match connections.take(source, limits) {
                Some(slot) => Some(Ok(
                    CoalescedWrites::new(stream).with_slot(slot, untrusted_time)
                )),
                None => {
                    tracing::debug!(?source, "too many connections; one more closed");
                    None
                }
            }
        }
    }))
}

impl<T: crate::security::tls::RemoteIp> crate::security::tls::RemoteIp for CoalescedWrites<T> {
    fn remote_ip(&self) -> Option<std::net::IpAddr> {
        self.inner.remote_ip()
    }
}

/// Largest run of bytes [`CoalescedWrites`] gathers before it writes.
const COALESCE_BYTES_MAX: usize = 256 * 1024;
/// A write at least this large, with nothing gathered before it, goes
/// straight to the socket: it fills a socket write on its own, and
/// gathering would copy it once more (a 55 KB history page, twice with the
/// buffer's growth).
const DIRECT_WRITE_BYTES: usize = 32 * 1024;
/// Turns of the runtime a flush waits out before it writes. Measured under
/// SESSION reads at 64 in flight: the cluster's socket writes per read were
/// 1.7 with none, 0.7 with one and 0.5-0.6 with two, and two served 30%
/// more reads/s than one; three gained nothing more (BENCHMARKS.md).
const FLUSH_YIELDS: u32 = 2;
/// Most buffer capacity a connection keeps once its bytes are written.
const BUF_BYTES_KEPT: usize = 64 * 1024;

/// A server-side connection whose flushes wait for [`FLUSH_YIELDS`] turns
/// of the runtime before they reach the socket.
///
/// h2 flushes at the end of each poll of its connection task, and tokio
/// runs a task woken by the one running right after it. So when a node's
/// reply completes many calls at once, each call's handler wakes the
/// connection, which writes that one response: a `writev` and a loopback
/// TCP round through the kernel per response, 30% of the cluster's CPU
/// under SESSION reads. Here a flush with bytes waiting first yields: the
/// task wakes itself and goes behind the handlers already queued, whose
/// responses then share one write. A yield when nothing else is queued
/// costs a few microseconds.
///
/// Only the router's public server uses it: the nodes' streams already
/// carry many calls per message.
///
/// Bytes gathered but not flushed are dropped with the connection. h2 and
/// hyper flush or shut down before they close, so this loses only what a
/// connection torn down on an error would have sent last (a TLS alert, a
/// GOAWAY after the peer's EOF).
pub struct CoalescedWrites<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` has reached `inner`.
    written: usize,
    /// Times a flush has yielded for what `buf` holds.
    yielded: u32,
    /// The connection's place among its listener's open connections.
    slot: Option<ConnectionSlot>,
    /// When the connection closes unless its slot is marked trusted first.
    untrusted_until: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> CoalescedWrites<T> {
    pub fn new(inner: T) -> CoalescedWrites<T> {
        CoalescedWrites {
            inner,
            buf: Vec::new(),
            written: 0,
            yielded: 0,
            slot: None,
            untrusted_until: None,
        }
    }

    fn with_slot(mut self, slot: ConnectionSlot, untrusted_time: Duration) -> CoalescedWrites<T> {
        self.slot = Some(slot);
        self.untrusted_until = Some(Box::pin(tokio::time::sleep(untrusted_time)));
        self
    }

    /// An error once the connection's untrusted time is out (its reads
    /// wait on that time too, so an idle connection is closed then).
    fn poll_trust(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(until) = self.untrusted_until.as_mut() else {
            return Ok(());
        };
        if self
            .slot
            .as_ref()
            .is_some_and(|s| s.trusted.load(Ordering::Relaxed))
        {
            self.untrusted_until = None;
            return Ok(());
        }
        match until.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no call with a valid token since the connection opened",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl<T: AsyncWrite + Unpin> CoalescedWrites<T> {
    /// Writes out everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        if self.buf.capacity() > BUF_BYTES_KEPT {
            // An idle connection does not keep a page-sized buffer.
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        self.written = 0;
        self.yielded = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: writes out what is gathered once
    /// it would pass [`COALESCE_BYTES_MAX`].
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() && self.buf.len() + len > COALESCE_BYTES_MAX {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescedWrites<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.poll_trust(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_room(cx, data.len()))?;
        if this.buf.is_empty() && data.len() >= DIRECT_WRITE_BYTES {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let len = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room(cx, len))?;
        if this.buf.is_empty() && len >= DIRECT_WRITE_BYTES {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        if this.yielded < FLUSH_YIELDS {
            this.yielded += 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected<ConnectInfo = tonic::transport::server::TcpConnectInfo>> Connected
    for CoalescedWrites<T>
{
    type ConnectInfo = PublicConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        PublicConnectInfo {
            tcp: self.inner.connect_info(),
            trusted: self.slot.as_ref().map(|s| s.trusted.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A listener holds at most its total and per-source counts of
    /// connections; a closed one makes room.
    #[test]
    fn connections_are_bounded_in_total_and_per_source() {
        let c = Arc::new(Connections::default());
        let a = Some("10.0.0.1".parse().unwrap());
        let b = Some("10.0.0.2".parse().unwrap());
        let limits = (3, 2);
        let a1 = c.take(a, limits).unwrap();
        let _a2 = c.take(a, limits).unwrap();
        assert!(c.take(a, limits).is_none(), "two from a source");
        let _b1 = c.take(b, limits).unwrap();
        assert!(c.take(b, limits).is_none(), "three in all");
        drop(a1);
        assert!(c.take(b, limits).is_some(), "a closed one makes room");
    }

    /// A real listener closes the connection past the bound at once and
    /// takes one again when another closes.
    #[tokio::test]
    async fn a_listener_closes_connections_past_its_bound() {
        use futures::StreamExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = incoming_within(listener, (10, 3), UNTRUSTED_TIME_MAX);
        let mut held = Vec::new();
        for _ in 0..3 {
            let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
            held.push((_client, incoming.next().await.unwrap().unwrap()));
        }
        let mut refused = tokio::net::TcpStream::connect(addr).await.unwrap();
        let next = tokio::time::timeout(Duration::from_millis(300), incoming.next()).await;
        assert!(next.is_err(), "no connection past the bound is handed on");
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), refused.read(&mut byte))
            .await
            .expect("the refused connection is closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        held.pop();
        let _again = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), incoming.next())
            .await
            .expect("room again once one closed")
            .unwrap()
            .unwrap();
    }

    /// A connection on which no call was marked trusted is closed once its
    /// untrusted time is out, even if it sends nothing; a marked one stays.
    #[tokio::test]
    async fn a_connection_without_a_trusted_call_is_closed_in_time() {
        use futures::StreamExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let untrusted_time = Duration::from_millis(300);
        let mut incoming = incoming_within(listener, (10, 10), untrusted_time);
        let _idle_client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut idle = incoming.next().await.unwrap().unwrap();
        let trusted_client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut trusted = incoming.next().await.unwrap().unwrap();
        // What a call on it finds in its extensions.
        let info = trusted.connect_info();
        assert_eq!(info.remote_addr(), trusted_client.local_addr().ok());
        info.trust();
        let mut byte = [0u8; 1];
        let started = std::time::Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(30), idle.read(&mut byte))
            .await
            .expect("the untrusted connection's read ends");
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(250));
        let read = tokio::time::timeout(untrusted_time * 3, trusted.read(&mut byte)).await;
        assert!(
            read.is_err(),
            "the trusted connection still waits: {read:?}"
        );
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Counts the wakes a poll asks for.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: std::sync::Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Polls flushes until one is ready; returns how many were pending,
    /// checking that each pending one asked to be polled again.
    fn flush_until_ready<T: AsyncWrite + Unpin>(conn: &mut CoalescedWrites<T>) -> u32 {
        let wakes = std::sync::Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        for pending in 0..=FLUSH_YIELDS {
            match Pin::new(&mut *conn).poll_flush(&mut cx) {
                Poll::Ready(r) => {
                    r.unwrap();
                    return pending;
                }
                Poll::Pending => assert_eq!(
                    wakes.0.load(std::sync::atomic::Ordering::SeqCst),
                    pending as usize + 1,
                    "a yielding flush wakes its task"
                ),
            }
        }
        panic!("a flush with nothing in its way stayed pending");
    }

    #[tokio::test]
    async fn writes_wait_for_a_flush_which_yields_first() {
        let (ours, mut peer) = tokio::io::duplex(1 << 20);
        let mut conn = CoalescedWrites::new(ours);
        for round in 0..2u8 {
            let (a, b) = (pattern(100, round), pattern(3000, round + 10));
            conn.write_all(&a).await.unwrap();
            let (b1, b2) = b.split_at(1000);
            let n = conn
                .write_vectored(&[IoSlice::new(b1), IoSlice::new(b2)])
                .await
                .unwrap();
            assert_eq!(n, b.len(), "a vectored write is taken whole");
            let mut got = vec![0u8; a.len() + b.len()];
            // Nothing reaches the peer before a flush.
            assert!(futures::poll!(Box::pin(peer.read(&mut got))).is_pending());
            // Every batch's flush yields FLUSH_YIELDS times (at least once).
            let yields = flush_until_ready(&mut conn);
            assert!(yields >= 1);
            assert_eq!(yields, FLUSH_YIELDS);
            peer.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [a, b].concat());
        }
        // With nothing gathered, a flush does not yield.
        assert_eq!(flush_until_ready(&mut conn), 0);
    }

    /// A large write with nothing gathered before it reaches the peer
    /// without a copy into the buffer (and so without a flush); one behind
    /// gathered bytes waits for them.
    #[tokio::test]
    async fn a_large_write_goes_straight_to_the_socket() {
        let (ours, mut peer) = tokio::io::duplex(1 << 20);
        let mut conn = CoalescedWrites::new(ours);
        let page = pattern(DIRECT_WRITE_BYTES, 7);
        conn.write_all(&page).await.unwrap();
        assert!(conn.buf.is_empty(), "nothing gathered");
        let mut got = vec![0u8; page.len()];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, page);
        let small = pattern(100, 8);
        conn.write_all(&small).await.unwrap();
        conn.write_all(&page).await.unwrap();
        assert_eq!(conn.buf.len(), small.len() + page.len(), "kept in order");
        flush_until_ready(&mut conn);
        let mut got = vec![0u8; small.len() + page.len()];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [small, page].concat());
    }

    #[tokio::test]
    async fn a_slow_peer_gets_every_byte_in_order() {
        // A pipe far smaller than what is written, so writes wait on it.
        let (ours, mut peer) = tokio::io::duplex(1024);
        let chunks: Vec<Vec<u8>> = (0..40)
            .map(|i| pattern(1 + (i * 7919) % 40_000, i as u8))
            .chain([pattern(COALESCE_BYTES_MAX + 5, 99)])
            .collect();
        let expected = chunks.concat();
        let writer = tokio::spawn(async move {
            let mut conn = CoalescedWrites::new(ours);
            for (i, c) in chunks.iter().enumerate() {
                if i % 2 == 0 {
                    conn.write_all(c).await.unwrap();
                } else {
                    // Vectored, as h2 writes a frame's head and payload.
                    let (head, rest) = c.split_at(c.len() / 3);
                    let mut parts = [IoSlice::new(head), IoSlice::new(rest)];
                    let mut parts = &mut parts[..];
                    while !parts.is_empty() {
                        let n = conn.write_vectored(parts).await.unwrap();
                        IoSlice::advance_slices(&mut parts, n);
                    }
                }
                // Flushes under backpressure, as h2 flushes after each poll.
                if i % 3 == 0 {
                    conn.flush().await.unwrap();
                }
            }
            conn.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), peer.read_to_end(&mut got))
            .await
            .expect("the peer read everything")
            .unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrived out of order");
    }
}
