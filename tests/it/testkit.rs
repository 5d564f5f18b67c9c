//! The test kit against real servers: PostgreSQL, OpenSSH sshd + ssh, and the fault proxy.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use sea_orm::{ConnectOptions, Database, DatabaseConnection};
use sea_orm_tunnel::testkit::{FaultProxy, KeyKind, OpenSshd, TempPostgres};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::support::{echo_server, select_one, servers, wait_until};

/// Generous bound for things that should happen at once, on a loaded 2-core machine.
const LIVENESS: Duration = Duration::from_secs(15);

async fn connect(url: &str) -> Result<DatabaseConnection, sea_orm::DbErr> {
    connect_within(url, Duration::from_secs(10)).await
}

/// sqlx keeps retrying a refused connect until its timeout, so checks that expect a failure
/// use a short one.
async fn connect_within(url: &str, timeout: Duration) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.max_connections(2)
        .connect_timeout(timeout)
        .acquire_timeout(timeout)
        .sqlx_logging(false);
    Database::connect(opts).await
}

async fn refused(url: &str) -> bool {
    connect_within(url, Duration::from_millis(500)).await.is_err()
}

async fn query_url(url: &str) -> Result<i32, sea_orm::DbErr> {
    let db = connect(url).await?;
    let one = select_one(&db).await?;
    db.close().await?;
    Ok(one)
}

/// PostgreSQL answers an SSLRequest with one byte, `S` or `N`.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Opens a raw connection to `addr` and checks that PostgreSQL answers on it.
async fn postgres_answers(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&SSL_REQUEST).await.unwrap();
    let mut byte = [0u8; 1];
    tokio::time::timeout(LIVENESS, stream.read_exact(&mut byte))
        .await
        .expect("PostgreSQL answers")
        .unwrap();
    assert!(byte[0] == b'S' || byte[0] == b'N', "not PostgreSQL: {byte:?}");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_starts_answers_restarts_stops_and_cleans_up() {
    let pg = TempPostgres::start().await.expect("PostgreSQL starts");
    assert!(pg.is_running());
    assert_eq!(pg.host(), "127.0.0.1");
    assert!(pg.url().starts_with(&format!("postgres://{}:", pg.user())));
    assert!(
        !format!("{pg:?}").contains(pg.password()),
        "Debug must not show the password"
    );

    let db = connect(&pg.url()).await.expect("connect with the generated password");
    assert_eq!(select_one(&db).await.unwrap(), 1);
    db.close().await.unwrap();

    let wrong = format!("postgres://{}:wrong@127.0.0.1:{}/postgres", pg.user(), pg.port());
    assert!(refused(&wrong).await, "password auth is enforced");

    pg.restart().await.expect("restart");
    assert_eq!(query_url(&pg.url()).await.expect("query after restart"), 1);

    pg.stop().await.expect("stop");
    assert!(!pg.is_running());
    assert!(
        TcpStream::connect(("127.0.0.1", pg.port())).await.is_err(),
        "nothing listens after stop"
    );
    assert!(refused(&pg.url()).await, "a stopped server refuses connections");

    pg.start_again().await.expect("start again on the same port");
    assert_eq!(query_url(&pg.url()).await.expect("query after start"), 1);

    // A crash (SIGKILL) and a restart with crash recovery.
    pg.kill();
    assert!(!pg.is_running());
    assert!(refused(&pg.url()).await, "a killed server refuses connections");
    pg.start_again().await.expect("start after a crash");
    assert_eq!(query_url(&pg.url()).await.expect("query after crash recovery"), 1);

    let other = pg.create_database("second_db").await.expect("create database");
    assert!(other.ends_with("/second_db"));
    assert_eq!(query_url(&other).await.expect("query the new database"), 1);

    let pid = pg.pid().expect("running");
    let dir = pg.dir().to_owned();
    drop(pg);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "postmaster {pid} is gone after drop"
    );
    assert!(!dir.exists(), "{} is removed after drop", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_forward_reaches_postgres_and_drop_sessions_keeps_listening() {
    let (pg, sshd) = servers().await;

    assert!(sshd.host_key_fingerprint().starts_with("SHA256:"));
    let known_hosts = std::fs::read_to_string(sshd.known_hosts_path()).unwrap();
    assert_eq!(
        known_hosts.trim(),
        format!("[127.0.0.1]:{} {}", sshd.port(), sshd.host_public_key())
    );
    assert!(sshd.host_public_key().starts_with("ssh-ed25519 "));

    let forward = sshd
        .ssh_forward("127.0.0.1", pg.port())
        .await
        .expect("ssh -N -L starts");
    assert!(
        forward.cipher().is_some(),
        "ssh -v reports the cipher:\n{}",
        forward.log()
    );
    let through = format!(
        "postgres://{}:{}@127.0.0.1:{}/postgres",
        pg.user(),
        pg.password(),
        forward.local_port()
    );
    let db = connect(&through).await.expect("connect through the forward");
    assert_eq!(select_one(&db).await.unwrap(), 1);
    db.close().await.unwrap();

    // A connection established through the session, then the session is killed: the
    // connection ends and the ssh client loses its server and exits.
    let mut established = postgres_answers(forward.local_addr()).await;
    assert!(sshd.drop_sessions() > 0, "there was an established session");
    let mut rest = [0u8; 1];
    let read = tokio::time::timeout(LIVENESS, established.read(&mut rest))
        .await
        .expect("the connection ends with its session");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    wait_until("ssh -N exiting after its session was killed", LIVENESS, || {
        !forward.is_running()
    })
    .await;
    assert!(sshd.is_running(), "the listener survives drop_sessions");

    // And it still accepts new sessions.
    let again = sshd.ssh_forward("127.0.0.1", pg.port()).await.expect("a new forward");
    let through = format!(
        "postgres://{}:{}@127.0.0.1:{}/postgres",
        pg.user(),
        pg.password(),
        again.local_port()
    );
    assert_eq!(query_url(&through).await.expect("query through the new forward"), 1);

    // stop / start_again on the same port.
    sshd.stop().await.unwrap();
    assert!(!sshd.is_running());
    wait_until("ssh -N exiting after sshd stopped", LIVENESS, || !again.is_running()).await;
    assert!(
        TcpStream::connect(sshd.addr()).await.is_err(),
        "nothing listens after stop"
    );
    sshd.start_again().await.unwrap();
    let third = sshd
        .ssh_forward("127.0.0.1", pg.port())
        .await
        .expect("forward after start_again");
    let through = format!(
        "postgres://{}:{}@127.0.0.1:{}/postgres",
        pg.user(),
        pg.password(),
        third.local_port()
    );
    assert_eq!(query_url(&through).await.expect("query after sshd restart"), 1);

    let tunnel = sshd.tunnel_config("127.0.0.1", pg.port());
    assert_eq!(
        (tunnel.host.as_str(), tunnel.port, tunnel.user.as_str()),
        ("127.0.0.1", sshd.port(), sshd.user())
    );
    assert_eq!(tunnel.known_hosts, sshd.known_hosts_path());
    assert_eq!(tunnel.auth.key_path.as_deref(), Some(sshd.client_key_path().as_path()));
    assert_eq!(
        (tunnel.remote_host.as_str(), tunnel.remote_port),
        ("127.0.0.1", pg.port())
    );

    let dir = sshd.dir().to_owned();
    let pid = sshd.pid().unwrap();
    drop(sshd);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "sshd {pid} is gone after drop"
    );
    assert!(!dir.exists());
}

async fn ssh_true(sshd: &OpenSshd, key: &Path) -> std::process::ExitStatus {
    let mut cmd = sshd.ssh_command(key);
    cmd.arg("true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    tokio::task::spawn_blocking(move || cmd.status())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_refuses_unauthorised_keys_and_changed_host_keys() {
    let sshd = OpenSshd::start().await.expect("sshd starts");
    assert!(
        ssh_true(&sshd, &sshd.client_key_path()).await.success(),
        "the generated key is accepted"
    );

    let stranger = sshd.generate_key(KeyKind::Ed25519, None).await.unwrap();
    assert!(
        !ssh_true(&sshd, &stranger).await.success(),
        "an unauthorised key is refused"
    );
    sshd.authorize_key(&stranger).unwrap();
    assert!(ssh_true(&sshd, &stranger).await.success(), "accepted once authorised");

    // An encrypted key opens only with its passphrase.
    let encrypted = sshd.generate_key(KeyKind::Ecdsa, Some("correct horse")).await.unwrap();
    let check = |pass: &str| {
        std::process::Command::new("ssh-keygen")
            .args(["-y", "-P", pass, "-f"])
            .arg(&encrypted)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(check("correct horse") && !check("wrong"));

    // Same port, new host key: OpenSSH with the old known_hosts refuses, then accepts once trusted.
    let old = sshd.host_key_fingerprint();
    sshd.rotate_host_key().await.unwrap();
    assert_ne!(old, sshd.host_key_fingerprint());
    assert!(
        !ssh_true(&sshd, &sshd.client_key_path()).await.success(),
        "changed host key is refused"
    );
    sshd.trust_host_key().unwrap();
    assert!(ssh_true(&sshd, &sshd.client_key_path()).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_sessions_are_a_silent_dead_link() {
    let (pg, sshd) = servers().await;
    let forward = sshd.ssh_forward("127.0.0.1", pg.port()).await.unwrap();

    drop(postgres_answers(forward.local_addr()).await);

    assert!(sshd.pause_sessions() > 0);
    let mut probe = TcpStream::connect(forward.local_addr()).await.unwrap();
    probe.write_all(&SSL_REQUEST).await.unwrap();
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), probe.read_exact(&mut byte))
            .await
            .is_err(),
        "a paused session answers nothing"
    );
    assert!(forward.is_running(), "the ssh client does not notice yet");

    sshd.resume_sessions();
    tokio::time::timeout(LIVENESS, probe.read_exact(&mut byte))
        .await
        .expect("answer after resume")
        .unwrap();
    assert!(byte[0] == b'S' || byte[0] == b'N');
}

async fn echo_roundtrip(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(LIVENESS, stream.read_exact(&mut buf))
        .await
        .expect("echo answered")
        .unwrap();
    assert_eq!(buf, msg);
}

#[tokio::test]
async fn fault_proxy_cut_resets_connections_and_keeps_accepting() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    echo_roundtrip(&mut client, b"hello").await;
    assert_eq!(proxy.connections(), 1);

    proxy.cut();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(LIVENESS, client.read(&mut buf))
        .await
        .expect("cut is noticed");
    match read {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
    wait_until("the proxy forgetting the cut connection", LIVENESS, || {
        proxy.connections() == 0
    })
    .await;

    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    echo_roundtrip(&mut fresh, b"after the cut").await;
    assert_eq!(proxy.total_connections(), 2);
}

#[tokio::test]
async fn fault_proxy_blackhole_holds_everything_until_restore() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut before = TcpStream::connect(proxy.addr()).await.unwrap();
    echo_roundtrip(&mut before, b"one").await;

    proxy.blackhole();
    assert!(proxy.is_blackholed());
    before.write_all(b"ping").await.expect("writes still succeed");
    let mut buf = [0u8; 4];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), before.read_exact(&mut buf))
            .await
            .is_err(),
        "nothing comes back through a blackhole"
    );

    // New connections are accepted but go nowhere either.
    let mut during = TcpStream::connect(proxy.addr())
        .await
        .expect("accepts while blackholed");
    during.write_all(b"pong").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), during.read_exact(&mut buf))
            .await
            .is_err(),
        "a new connection is blackholed too"
    );
    assert_eq!(proxy.connections(), 2, "blackholed sockets stay open");

    proxy.restore();
    tokio::time::timeout(LIVENESS, before.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping", "held data is delivered after restore");
    tokio::time::timeout(LIVENESS, during.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"pong");
    echo_roundtrip(&mut before, b"two").await;
    echo_roundtrip(&mut during, b"three").await;

    // Dropping the proxy resets what is left.
    drop(proxy);
    let mut rest = [0u8; 1];
    let read = tokio::time::timeout(LIVENESS, before.read(&mut rest))
        .await
        .expect("drop is noticed");
    assert!(matches!(read, Err(_) | Ok(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_pools_in_transaction_mode_restarts_and_pauses() {
    use sea_orm::ConnectionTrait;
    use sea_orm_tunnel::testkit::{PgBouncer, PoolMode};

    let pg = TempPostgres::start().await.unwrap();
    let bouncer = PgBouncer::builder()
        .mode(PoolMode::Transaction)
        .default_pool_size(2)
        .start(&pg)
        .await
        .unwrap();
    assert_eq!(bouncer.mode(), PoolMode::Transaction);
    // As PgBouncer ships: sqlx's `extra_float_digits` is refused with its own message.
    let refused = sea_orm::Database::connect(bouncer.url()).await.unwrap_err().to_string();
    assert!(refused.contains("unsupported startup parameter"), "{refused}");
    // A simple-protocol client is served, through the pool.
    let pools = bouncer.admin("SHOW POOLS").await.unwrap();
    assert!(pools.contains("pool_mode") || pools.contains("cl_active"), "{pools}");
    let tolerant = PgBouncer::builder()
        .ignore_startup_parameter("extra_float_digits")
        .start(&pg)
        .await
        .unwrap();
    let db = sea_orm::Database::connect(tolerant.url()).await.unwrap();
    db.execute_unprepared("SELECT 1").await.unwrap();
    // Restart on the same port: the pool reconnects.
    tolerant.restart().await.unwrap();
    let db = sea_orm::Database::connect(tolerant.url()).await.unwrap();
    db.execute_unprepared("SELECT 1").await.unwrap();
    // PAUSE holds queries until RESUME.
    tolerant.pause().await.unwrap();
    let held = tokio::spawn({
        let url = tolerant.url();
        async move {
            let db = sea_orm::Database::connect(url).await.unwrap();
            db.execute_unprepared("SELECT 1").await.map(|_| ())
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "held while paused");
    tolerant.resume().await.unwrap();
    held.await.unwrap().unwrap();
    // The server saw at most the pool's connections from PgBouncer.
    let log = std::fs::read_to_string(tolerant.log_path()).unwrap();
    assert!(
        log.contains("new connection to server") || log.contains("login attempt"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_proxy_adds_its_round_trip_and_delivers_every_byte_in_order() {
    use sea_orm_tunnel::testkit::DelayProxy;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let echo = echo_server().await;
    let rtt = std::time::Duration::from_millis(40);
    let far = DelayProxy::start(echo.addr, rtt).await.unwrap();
    assert_eq!(far.rtt(), rtt);
    // One byte there and back: at least the added round trip, and not rounded up to the next
    // millisecond twice per trip (as tokio's timer did, adding 2-3 ms at 50 ms).
    let mut s = tokio::net::TcpStream::connect(far.addr()).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut trips = Vec::new();
    for _ in 0..10 {
        let started = std::time::Instant::now();
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        trips.push(started.elapsed());
    }
    trips.sort();
    eprintln!("round trips through a {rtt:?} DelayProxy: {trips:?}");
    assert!(trips[0] >= rtt, "a round trip through it took {:?}", trips[0]);
    assert!(
        trips[0] < rtt + std::time::Duration::from_millis(2),
        "the fastest of 10 round trips took {:?}",
        trips[0]
    );
    drop(s);
    // Bulk data arrives whole and in order.
    super::support::echo_roundtrip(far.addr(), (0..4_000_000u32).map(|i| (i % 251) as u8).collect()).await;
}
