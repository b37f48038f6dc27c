//! A loopback TCP proxy that can cut every connection and refuse new ones, then recover: a
//! network partition between an agent and the controller, on one machine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Bumped on cut: connections of an older generation end.
    generation: Arc<AtomicU64>,
    cut_signal: Arc<tokio::sync::watch::Sender<u64>>,
    cancel: CancellationToken,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(AtomicU64::new(0));
        let cut_signal = Arc::new(tokio::sync::watch::channel(0u64).0);
        let cancel = CancellationToken::new();
        let (u, g, c, k) = (
            up.clone(),
            generation.clone(),
            cut_signal.clone(),
            cancel.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = k.cancelled() => return,
                };
                if !u.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let my_gen = g.load(Ordering::SeqCst);
                let mut cut_rx = c.subscribe();
                let k = k.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = async { while cut_rx.changed().await.is_ok() { if *cut_rx.borrow() > my_gen { return } } } => {}
                        _ = k.cancelled() => {}
                    }
                });
            }
        });
        Ok(Proxy {
            addr,
            up,
            generation,
            cut_signal,
            cancel,
        })
    }

    /// Drops every connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.cut_signal.send_replace(g);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
