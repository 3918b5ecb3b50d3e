//! A fault-injecting TCP proxy for one directed link (client side → server
//! side): a stall of either direction (one-way partition: bytes are held, as
//! a black-holed path would hold TCP), and a cut (full partition: connections
//! are closed and new ones refused). Distance between regions is not the
//! proxy's job: nodes and routers simulate it from the config's `[latency]`
//! table (`chatstore::cluster::latency`), the same way `chatstore dev --geo`
//! does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[derive(Default)]
pub struct LinkControl {
    /// Hold bytes from client to server.
    pub stall_up: AtomicBool,
    /// Hold bytes from server to client.
    pub stall_down: AtomicBool,
    /// Full partition: close connections, refuse new ones.
    pub cut: AtomicBool,
    /// Bumped on every cut so running connections notice.
    generation: AtomicU64,
}

impl LinkControl {
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if cut {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn heal(&self) {
        self.set_cut(false);
        self.stall_up.store(false, Ordering::SeqCst);
        self.stall_down.store(false, Ordering::SeqCst);
    }
}

pub struct Proxy {
    pub addr: String,
    pub ctl: Arc<LinkControl>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let ctl = Arc::new(LinkControl::default());
        let c = ctl.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if c.cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let (c, target) = (c.clone(), target.clone());
                conns.spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let gen = c.generation.load(Ordering::SeqCst);
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    let up = pump(ir, ow, c.clone(), true, gen);
                    let down = pump(or, iw, c.clone(), false, gen);
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Proxy { addr, ctl, task }
    }
}

/// Copies one direction, holding bytes while stalled and stopping when the
/// link is cut.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    c: Arc<LinkControl>,
    up: bool,
    gen: u64,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let cut = |c: &LinkControl| {
        c.cut.load(Ordering::SeqCst) || c.generation.load(Ordering::SeqCst) != gen
    };
    let c2 = c.clone();
    let writer = async move {
        while let Some(bytes) = rx.recv().await {
            loop {
                if cut(&c2) {
                    return;
                }
                let stalled = if up {
                    c2.stall_up.load(Ordering::SeqCst)
                } else {
                    c2.stall_down.load(Ordering::SeqCst)
                };
                if !stalled {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if w.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tokio::select! {
                n = r.read(&mut buf) => n,
                _ = async { while !cut(&c) { tokio::time::sleep(Duration::from_millis(20)).await } } => return,
            };
            match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    };
    // The reader ends on EOF or a cut and drops its sender; the writer then
    // drains what it holds and closes its side.
    tokio::join!(writer, reader);
}
