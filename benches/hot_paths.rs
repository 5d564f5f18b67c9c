//! criterion benches of the hot paths, each next to its baseline:
//!
//! - `channel_copy`: 1 MiB responses through this crate's tunnel vs a plain loopback TCP proxy
//!   (`copy_bidirectional`, no SSH) vs OpenSSH `ssh -N -L` vs no hop at all;
//! - `russh_variants`: the same through a minimal raw-russh forwarder with other ciphers, window,
//!   packet and copy-buffer sizes, to check the tunnel's settings against the alternatives;
//! - `acquire`: a connection checkout + return through the manager's pool (our hooks) vs a raw
//!   sqlx pool (with and without sqlx's default ping);
//! - `layer`: one request through `InjectDatabaseLayer` / `RecoveryLayer` vs a bare
//!   `tower::service_fn`.
//!
//! Run with: `cargo bench --bench hot_paths` (a few minutes; short measurement windows).

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Method, Request, Response};
use http_body_util::Full;
use sea_orm::sqlx::postgres::PgPoolOptions;
use sea_orm_tunnel::ConnectionManager;
use sea_orm_tunnel::config::Config;
use sea_orm_tunnel::layer::recovery::RecoveryBody;
use sea_orm_tunnel::layer::{InjectDatabaseLayer, RecoveryLayer};
use sea_orm_tunnel::testkit::{OpenSshd, TempPostgres};
use sea_orm_tunnel::tunnel::SshTunnel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt, service_fn};

const CHUNK: usize = 1 << 20;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A server that answers each 4-byte big-endian length with that many bytes.
async fn byte_source() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let payload = vec![0x5a_u8; CHUNK];
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let _ = s.set_nodelay(true);
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 4];
                while s.read_exact(&mut len).await.is_ok() {
                    let n = (u32::from_be_bytes(len) as usize).min(CHUNK);
                    if s.write_all(&payload[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A plain loopback TCP proxy: what the tunnel does, minus SSH.
async fn tcp_proxy(target: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let _ = client.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

/// `iters` fetches of one response each; their total time.
async fn fetch_n(stream: &mut TcpStream, buf: &mut [u8], iters: u64) -> std::time::Duration {
    let t = Instant::now();
    for _ in 0..iters {
        fetch(stream, buf).await;
    }
    t.elapsed()
}

async fn fetch(stream: &mut TcpStream, buf: &mut [u8]) {
    stream.write_all(&(buf.len() as u32).to_be_bytes()).await.unwrap();
    stream.read_exact(buf).await.unwrap();
}

/// One russh client configuration to compare in `russh_variants`.
struct Variant {
    name: &'static str,
    cipher: russh::cipher::Name,
    window: u32,
    packet: u32,
    copy_buf: usize,
}

/// Accepts the one host key we expect (the test server's fingerprint): a bench must not
/// accept any key either.
struct PinnedKey(String);

impl russh::client::Handler for PinnedKey {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        Ok(key.fingerprint(russh::keys::HashAlg::Sha256).to_string() == self.0)
    }
}

/// Re-arms `TCP_QUICKACK` after every read, as the tunnel's transport socket does (no 40 ms delayed-ACK stall),
/// so the variants differ from the tunnel only in the settings under test.
struct QuickAck(TcpStream);

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let res = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if res.is_ready() {
            let _ = socket2::SockRef::from(&self.0).set_tcp_quickack(true);
        }
        res
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A minimal forwarder on raw russh with `variant`'s settings: one session, one channel per
/// local connection, `copy_bidirectional_with_sizes`. It isolates what the russh settings cost,
/// so the tunnel's choices can be checked against the alternatives.
async fn russh_forwarder(sshd: &OpenSshd, target: SocketAddr, variant: &Variant) -> SocketAddr {
    use std::borrow::Cow;
    use std::sync::Arc;
    let config = Arc::new(russh::client::Config {
        nodelay: true,
        window_size: variant.window,
        maximum_packet_size: variant.packet,
        preferred: russh::Preferred {
            cipher: Cow::Owned(vec![variant.cipher]),
            ..russh::Preferred::default()
        },
        ..Default::default()
    });
    let tcp = TcpStream::connect(sshd.addr()).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let tcp = QuickAck(tcp);
    let mut handle = russh::client::connect_stream(config, tcp, PinnedKey(sshd.host_key_fingerprint()))
        .await
        .expect("russh connect");
    let key = russh::keys::load_secret_key(sshd.client_key_path(), None).unwrap();
    let auth = handle
        .authenticate_publickey(
            sshd.user(),
            russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .unwrap();
    assert!(auth.success(), "russh auth");
    let handle = Arc::new(handle);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let copy_buf = variant.copy_buf;
    tokio::spawn(async move {
        loop {
            let Ok((mut local, _)) = listener.accept().await else {
                return;
            };
            let _ = local.set_nodelay(true);
            let handle = handle.clone();
            tokio::spawn(async move {
                let channel = handle
                    .channel_open_direct_tcpip(target.ip().to_string(), u32::from(target.port()), "127.0.0.1", 0)
                    .await
                    .unwrap();
                let mut remote = channel.into_stream();
                let _ = tokio::io::copy_bidirectional_with_sizes(&mut local, &mut remote, copy_buf, copy_buf).await;
            });
        }
    });
    addr
}

fn russh_variants(c: &mut Criterion) {
    use russh::cipher::{AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305};
    let rt = runtime();
    let (sshd, source) = rt.block_on(async { (OpenSshd::start().await.expect("sshd"), byte_source().await) });
    // The first is the tunnel's current choice (src/tunnel/session.rs, forward.rs).
    let variants = [
        Variant {
            name: "aes256-gcm_w8M_p32K_buf32K",
            cipher: AES_256_GCM,
            window: 8 << 20,
            packet: 32 << 10,
            copy_buf: 32 << 10,
        },
        Variant {
            name: "aes128-gcm_w8M_p32K_buf32K",
            cipher: AES_128_GCM,
            window: 8 << 20,
            packet: 32 << 10,
            copy_buf: 32 << 10,
        },
        Variant {
            name: "chacha20_w8M_p32K_buf32K",
            cipher: CHACHA20_POLY1305,
            window: 8 << 20,
            packet: 32 << 10,
            copy_buf: 32 << 10,
        },
        Variant {
            name: "aes256-gcm_w2M_p32K_buf32K",
            cipher: AES_256_GCM,
            window: 2 << 20,
            packet: 32 << 10,
            copy_buf: 32 << 10,
        },
        Variant {
            name: "aes256-gcm_w8M_p64K_buf128K",
            cipher: AES_256_GCM,
            window: 8 << 20,
            packet: 64 << 10,
            copy_buf: 128 << 10,
        },
    ];
    let mut group = c.benchmark_group("russh_variants");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    group.sample_size(20);
    for variant in &variants {
        let mut stream = rt.block_on(async {
            let addr = russh_forwarder(&sshd, source, variant).await;
            let s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            s
        });
        let mut buf = vec![0u8; CHUNK];
        group.bench_function(format!("1MiB/{}", variant.name), |b| {
            b.iter_custom(|iters| rt.block_on(fetch_n(&mut stream, &mut buf, iters)))
        });
    }
    group.finish();
    drop(sshd);
}

fn channel_copy(c: &mut Criterion) {
    let rt = runtime();
    let (sshd, source, proxy, tunnel, forward) = rt.block_on(async {
        let sshd = OpenSshd::start().await.expect("sshd");
        let source = byte_source().await;
        let proxy = tcp_proxy(source).await;
        let tunnel = SshTunnel::connect(sshd.tunnel_config("127.0.0.1", source.port()))
            .await
            .expect("tunnel");
        let forward = sshd.ssh_forward("127.0.0.1", source.port()).await.expect("ssh -N -L");
        (sshd, source, proxy, tunnel, forward)
    });
    let targets = [
        ("no_hop", source),
        ("loopback_tcp_proxy", proxy),
        ("tunnel", tunnel.local_endpoint().tcp_addr().unwrap()),
        ("openssh", forward.local_addr()),
    ];
    let mut group = c.benchmark_group("channel_copy");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    group.sample_size(20);
    for (name, addr) in targets {
        let mut stream = rt.block_on(async {
            let s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            s
        });
        let mut buf = vec![0u8; CHUNK];
        group.bench_function(format!("1MiB/{name}"), |b| {
            b.iter_custom(|iters| rt.block_on(fetch_n(&mut stream, &mut buf, iters)))
        });
    }
    group.finish();
    rt.block_on(tunnel.disconnect());
    drop((forward, sshd));
}

/// A handler that does nothing, so what is measured is the layer around it.
fn handler<B>() -> impl Service<
    Request<B>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
> + Clone
+ Send
+ 'static {
    service_fn(|_req: Request<B>| async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())) })
}

fn acquire_and_layers(c: &mut Criterion) {
    let rt = runtime();
    let (pg, manager, raw_default, raw_no_ping) = rt.block_on(async {
        let pg = TempPostgres::start().await.expect("PostgreSQL");
        let manager = ConnectionManager::new(Config::new(pg.url()).map_pool(|p| p.max_connections(4)))
            .await
            .expect("manager");
        let raw_default = PgPoolOptions::new()
            .max_connections(4)
            .connect(&pg.url())
            .await
            .unwrap();
        let raw_no_ping = PgPoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect(&pg.url())
            .await
            .unwrap();
        (pg, manager, raw_default, raw_no_ping)
    });

    let mut group = c.benchmark_group("acquire");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    group.sample_size(30);
    let manager_pool = manager.connection().get_postgres_connection_pool().clone();
    for (name, pool) in [
        ("manager", manager_pool),
        ("sqlx_default", raw_default),
        ("sqlx_no_ping", raw_no_ping),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        let conn = pool.acquire().await.unwrap();
                        black_box(&conn);
                        drop(conn);
                    }
                    t.elapsed()
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("layer");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    group.sample_size(30);
    let request = |method: Method| {
        Request::builder()
            .method(method)
            .uri("/items/1")
            .header("x-request-id", "bench-request-1")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    macro_rules! bench_service {
        ($name:expr, $method:expr, $svc:expr) => {{
            let svc = $svc;
            group.bench_function($name, |b| {
                b.iter_custom(|iters| {
                    let mut svc = svc.clone();
                    rt.block_on(async {
                        let t = Instant::now();
                        for _ in 0..iters {
                            let response = svc.ready().await.unwrap().call(request($method)).await.unwrap();
                            black_box(response);
                        }
                        t.elapsed()
                    })
                })
            });
        }};
    }
    bench_service!("bare_service_fn", Method::POST, handler::<Full<Bytes>>());
    bench_service!(
        "inject",
        Method::POST,
        InjectDatabaseLayer::new(manager.clone()).layer(handler::<Full<Bytes>>())
    );
    bench_service!(
        "recovery/post_pass_through",
        Method::POST,
        RecoveryLayer::new(manager.clone()).layer(handler::<RecoveryBody<Full<Bytes>>>())
    );
    bench_service!(
        "recovery/get_retryable",
        Method::GET,
        RecoveryLayer::new(manager.clone()).layer(handler::<RecoveryBody<Full<Bytes>>>())
    );
    bench_service!(
        "inject+recovery/get",
        Method::GET,
        InjectDatabaseLayer::new(manager.clone())
            .layer(RecoveryLayer::new(manager.clone()).layer(handler::<RecoveryBody<Full<Bytes>>>()))
    );
    group.finish();
    rt.block_on(manager.shutdown(Duration::from_secs(1)));
    drop(pg);
}

criterion_group!(benches, channel_copy, russh_variants, acquire_and_layers);
criterion_main!(benches);
