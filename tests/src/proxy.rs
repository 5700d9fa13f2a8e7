//! A TCP proxy on 127.0.0.1 between clients and a backend, for the network faults an
//! SDK interceptor cannot fake: connections cut in the middle of a response (with a TCP
//! reset), slow responses, and blackouts during which new connections are refused and
//! live ones cut. Point a client at [`ChaosProxy::endpoint`] instead of the backend.
//!
//! Faults go through the real code paths (hyper, the SDK's retries and timeouts, the
//! library's own), which is the point. The proxy holds no schedule of its own: a test or
//! the chaos runner sets [`ProxyFault`]s when it wants them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What the proxy does to the connections it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProxyFault {
    /// Passes everything through.
    #[default]
    None,
    /// Holds every chunk of every response this long before passing it on.
    Slow(Duration),
    /// Refuses new connections (accepts and resets them at once) and cuts live ones.
    Blackout,
    /// Passes at most this many bytes of each response, then resets the connection.
    ResetAfter(usize),
}

#[derive(Debug)]
struct State {
    fault: Mutex<ProxyFault>,
    /// Bumped to cut every live connection; each connection watches it.
    generation: tokio::sync::watch::Sender<u64>,
    /// Connections accepted so far.
    accepted: AtomicU64,
    /// Connections cut or reset by a fault so far.
    cut: AtomicU64,
}

impl State {
    fn fault(&self) -> MutexGuard<'_, ProxyFault> {
        self.fault.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running proxy; stopped when dropped or by [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct ChaosProxy {
    addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl ChaosProxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `upstream`.
    ///
    /// # Errors
    /// When the listener cannot be bound.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            fault: Mutex::default(),
            generation: tokio::sync::watch::Sender::new(0),
            accepted: AtomicU64::new(0),
            cut: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, upstream, state.clone(), stop.clone()));
        Ok(Self { addr, state, stop })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, for an SDK endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies `fault` from now on. A blackout also cuts the live connections.
    pub fn set(&self, fault: ProxyFault) {
        *self.state.fault() = fault;
        if fault == ProxyFault::Blackout {
            self.cut_all();
        }
    }

    /// Cuts every live connection (with a reset).
    pub fn cut_all(&self) {
        self.state.generation.send_modify(|g| *g += 1);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Connections cut or reset by a fault so far.
    pub fn cut(&self) -> u64 {
        self.state.cut.load(Ordering::SeqCst)
    }

    /// Stops accepting and cuts every connection.
    pub fn shutdown(&self) {
        self.cut_all();
        self.stop.cancel();
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, state: Arc<State>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else { continue };
        state.accepted.fetch_add(1, Ordering::SeqCst);
        if *state.fault() == ProxyFault::Blackout {
            state.cut.fetch_add(1, Ordering::SeqCst);
            reset(client);
            continue;
        }
        tokio::spawn(carry(client, upstream, state.clone(), stop.clone()));
    }
}

/// Closes with a TCP reset rather than an orderly shutdown.
fn reset(stream: TcpStream) {
    // Through std: tokio's `set_linger` is deprecated for blocking on drop, which a zero
    // linger never does.
    if let Ok(std_stream) = stream.into_std() {
        let socket = socket2::SockRef::from(&std_stream);
        let _ = socket.set_linger(Some(Duration::ZERO));
    }
}

/// Carries one connection: requests upstream as they come, responses back under the
/// current fault, until either side closes, a fault cuts it, or the proxy stops.
async fn carry(client: TcpStream, upstream: SocketAddr, state: Arc<State>, stop: CancellationToken) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        reset(client);
        return;
    };
    let mut generation = state.generation.subscribe();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    };
    let responses = async {
        let mut buffer = vec![0u8; 16 * 1024];
        let mut sent = 0usize;
        loop {
            let n = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            let fault = *state.fault();
            let mut chunk = &buffer[..n];
            match fault {
                ProxyFault::Slow(delay) => tokio::time::sleep(delay).await,
                ProxyFault::ResetAfter(limit) => {
                    let room = limit.saturating_sub(sent);
                    if chunk.len() > room {
                        chunk = &chunk[..room];
                        let _ = client_write.write_all(chunk).await;
                        return true;
                    }
                }
                ProxyFault::Blackout => return true,
                ProxyFault::None => {}
            }
            if client_write.write_all(chunk).await.is_err() {
                return false;
            }
            sent += chunk.len();
        }
    };
    // Cut when the generation moves (a blackout, `cut_all`) or the proxy stops.
    let cut = async {
        tokio::select! {
            _ = generation.changed() => {}
            () = stop.cancelled() => {}
        }
        true
    };
    let cut_by_fault = tokio::select! {
        () = requests => false,
        by_fault = responses => by_fault,
        by_fault = cut => by_fault,
    };
    if cut_by_fault {
        state.cut.fetch_add(1, Ordering::SeqCst);
        if let Ok(client) = client_read.reunite(client_write) {
            reset(client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that answers every read with `answer`.
    async fn upstream(answer: &'static [u8]) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buffer).await {
                        if n == 0 || stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(addr)
    }

    /// Sends `ping`, reads until `want` bytes, EOF or an error; returns what came.
    async fn exchange(proxy: &ChaosProxy, want: usize) -> anyhow::Result<(Vec<u8>, bool)> {
        let mut stream = TcpStream::connect(proxy.addr()).await?;
        stream.write_all(b"ping").await?;
        let mut got = Vec::new();
        let mut buffer = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await? {
                Ok(0) => return Ok((got, false)),
                Ok(n) => {
                    got.extend_from_slice(&buffer[..n]);
                    if got.len() >= want {
                        return Ok((got, true));
                    }
                }
                Err(_) => return Ok((got, false)),
            }
        }
    }

    #[tokio::test]
    async fn passes_slows_resets_and_blacks_out() -> anyhow::Result<()> {
        let answer: &'static [u8] = b"0123456789abcdef";
        let proxy = ChaosProxy::start(upstream(answer).await?).await?;
        assert_eq!(exchange(&proxy, answer.len()).await?, (answer.to_vec(), true));

        proxy.set(ProxyFault::Slow(Duration::from_millis(300)));
        let started = tokio::time::Instant::now();
        assert_eq!(exchange(&proxy, answer.len()).await?.0, answer);
        assert!(started.elapsed() >= Duration::from_millis(300));

        proxy.set(ProxyFault::ResetAfter(5));
        let (got, complete) = exchange(&proxy, answer.len()).await?;
        assert_eq!((got.as_slice(), complete), (&answer[..5], false), "cut after 5 bytes");

        proxy.set(ProxyFault::Blackout);
        let (got, complete) = exchange(&proxy, 1).await?;
        assert!(got.is_empty() && !complete, "refused");

        proxy.set(ProxyFault::None);
        assert_eq!(exchange(&proxy, answer.len()).await?, (answer.to_vec(), true));
        assert!(proxy.cut() >= 2);
        assert_eq!(proxy.accepted(), 5);
        Ok(())
    }

    #[tokio::test]
    async fn a_blackout_cuts_live_connections() -> anyhow::Result<()> {
        let proxy = ChaosProxy::start(upstream(b"x").await?).await?;
        let mut stream = TcpStream::connect(proxy.addr()).await?;
        stream.write_all(b"ping").await?;
        let mut buffer = [0u8; 8];
        assert_eq!(stream.read(&mut buffer).await?, 1);
        proxy.set(ProxyFault::Blackout);
        let end = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await?;
        assert!(matches!(end, Ok(0) | Err(_)), "cut: {end:?}");
        Ok(())
    }

    /// Through the SDK: a Kinesis client pointed at the proxy fails during a blackout
    /// and works again after it.
    #[tokio::test]
    async fn an_sdk_client_sees_the_blackout() -> anyhow::Result<()> {
        let backend = kcl_local::LocalBackend::start().await?;
        let upstream: SocketAddr = backend.kinesis_endpoint().trim_start_matches("http://").parse()?;
        let proxy = ChaosProxy::start(upstream).await?;
        let config = kcl_local::sdk_config_for_endpoint(&proxy.endpoint(), "us-east-1");
        let conf = aws_sdk_kinesis::config::Builder::from(&config)
            .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled())
            .build();
        let kinesis = aws_sdk_kinesis::Client::from_conf(conf);
        kcl_local::create_stream(&kinesis, "through-proxy", 1).await?;
        proxy.set(ProxyFault::Blackout);
        assert!(kinesis.list_streams().send().await.is_err());
        proxy.set(ProxyFault::None);
        let streams = kinesis.list_streams().send().await?;
        assert!(streams.stream_names().iter().any(|s| s == "through-proxy"));
        backend.shutdown().await;
        Ok(())
    }
}
