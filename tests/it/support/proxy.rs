//! A TCP proxy between the vault and PostgreSQL that a test can stall or take down, to
//! show what the vault does when its database hangs or disappears, without touching the
//! PostgreSQL server other tests share.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyState {
    /// Bytes flow both ways.
    Forward,
    /// Connections stay open but no byte moves: a hung database.
    Stall,
    /// Every connection is cut and new ones are closed at once: a stopped database.
    Down,
}

pub struct TcpProxy {
    pub addr: SocketAddr,
    state: watch::Sender<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, _) = watch::channel(ProxyState::Forward);
        let states = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = states.subscribe();
                if *rx.borrow() == ProxyState::Down {
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        relay(client, server, rx).await;
                    }
                });
            }
        });
        TcpProxy { addr, state, task }
    }

    pub fn set(&self, state: ProxyState) {
        self.state.send_replace(state);
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn rewrite_url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (authority, path) = rest.split_once('/').unwrap();
        let user = authority
            .rsplit_once('@')
            .map(|(user, _)| format!("{user}@"));
        format!(
            "{scheme}://{}{}/{path}",
            user.unwrap_or_default(),
            self.addr
        )
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.send_replace(ProxyState::Down);
    }
}

async fn relay(client: TcpStream, server: TcpStream, state: watch::Receiver<ProxyState>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        () = pump(client_read, server_write, state.clone()) => {}
        () = pump(server_read, client_write, state.clone()) => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<ProxyState>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = state.wait_for(|s| *s == ProxyState::Down) => return,
        };
        let Ok(now) = state
            .wait_for(|s| *s != ProxyState::Stall)
            .await
            .map(|s| *s)
        else {
            return;
        };
        if now == ProxyState::Down || to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
