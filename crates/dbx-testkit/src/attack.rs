//! Hostile peers and the means to observe a daemon under attack, for the tests of
//! issue 13 ("safe on a hostile network"): oversized and expanding frames, peers that
//! never read, sockets from chosen loopback addresses, stalled writes, and the
//! daemon's resident memory from `/proc`.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dbx_client::Connection;
use dbx_proto::{AircraftRef, PointForm, ServerMessage};
use tokio::net::{TcpSocket, TcpStream};
use tokio_postgres::Client;
use uuid::Uuid;

use dbx_core::now_micros;

/// A field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`); 0 when unreadable.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Resident memory of a process now, bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS")
}

/// The most resident memory a process has had, bytes.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM")
}

/// CPU time a process has used so far, all its threads together, in nanoseconds
/// (`/proc/<pid>/task/*/schedstat`); 0 when unreadable.
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Raises this process's open-files limit to its hard limit (a daemon started after
/// this inherits it); the new soft limit.
pub fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// The hello of issue 13 as a whole frame: `points` first, one point with `keys`
/// distinct unknown keys (`nil` values, 10 bytes each), then `t`, `v`, `key`.
pub fn many_key_hello(keys: usize, key: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(keys * 10 + 64);
    let w = &mut body;
    rmp::encode::write_map_len(w, 4).expect("vec");
    rmp::encode::write_str(w, "points").expect("vec");
    rmp::encode::write_array_len(w, 1).expect("vec");
    rmp::encode::write_map_len(w, keys as u32 + 2).expect("vec");
    rmp::encode::write_str(w, "ts").expect("vec");
    rmp::encode::write_sint(w, now_micros()).expect("vec");
    rmp::encode::write_str(w, "seq").expect("vec");
    rmp::encode::write_uint(w, 1).expect("vec");
    for i in 0..keys {
        rmp::encode::write_str(w, &format!("k{i:07}")).expect("vec");
        rmp::encode::write_nil(w).expect("vec");
    }
    rmp::encode::write_str(w, "t").expect("vec");
    rmp::encode::write_str(w, "hello").expect("vec");
    rmp::encode::write_str(w, "v").expect("vec");
    rmp::encode::write_uint(w, 1).expect("vec");
    rmp::encode::write_str(w, "key").expect("vec");
    rmp::encode::write_str(w, key).expect("vec");
    framed(&body)
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    dbx_proto::write_frame(&mut b, body);
    b.to_vec()
}

/// A batch frame of exactly `frame_bytes` body bytes (≥ 300): one valid point whose
/// only extra value is a string of control characters, which the daemon stores as
/// `\u00XX` escapes — six bytes of memory per byte received, the most any input grows.
pub fn control_char_batch(seq: u64, aircraft: Uuid, session: Uuid, frame_bytes: usize) -> Vec<u8> {
    let build = |n: usize| {
        let text: String = (0..n).map(|i| char::from(0x0e + (i % 17) as u8)).collect();
        let mut p = dbx_core::Point::new(now_micros(), seq as i64);
        p.extra = Some(serde_json::json!({ "c": text }).to_string());
        let mut b = BytesMut::new();
        dbx_proto::encode_batch(
            &mut b,
            seq,
            &AircraftRef::Id(aircraft),
            session,
            &[p],
            PointForm::Map,
        )
        .expect("a valid point");
        b
    };
    // The string's header grows with it: size once, then correct by the difference.
    let guess = frame_bytes - (build(0).len() - 4);
    let over = (build(guess).len() - 4) - frame_bytes;
    let frame = build(guess - over);
    assert_eq!(frame.len() - 4, frame_bytes, "control_char_batch sizing");
    frame.to_vec()
}

/// A batch frame the daemon nacks at once (its only point has `lat` 91): what a peer
/// sends to make the daemon write without end.
pub fn nacked_batch(seq: u64, aircraft: Uuid) -> Vec<u8> {
    let mut p = dbx_core::Point::new(now_micros(), 1);
    p.lat = Some(91.0);
    let mut b = BytesMut::new();
    dbx_proto::encode_batch(
        &mut b,
        seq,
        &AircraftRef::Id(aircraft),
        Uuid::nil(),
        &[p],
        PointForm::Map,
    )
    .expect("encodes");
    b.to_vec()
}

/// A TCP connection to `addr` from `local` (any port), with a receive buffer of
/// `rcvbuf` bytes when given (set before connecting, so that it sticks).
pub async fn try_connect_from(
    local: IpAddr,
    addr: SocketAddr,
    rcvbuf: Option<u32>,
) -> std::io::Result<TcpStream> {
    let sock = match local {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }?;
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n)?;
    }
    sock.bind(SocketAddr::new(local, 0))?;
    sock.connect(addr).await
}

/// [`try_connect_from`], panicking when it fails.
pub async fn connect_from(local: IpAddr, addr: SocketAddr, rcvbuf: Option<u32>) -> TcpStream {
    try_connect_from(local, addr, rcvbuf)
        .await
        .unwrap_or_else(|e| panic!("connect to dbx {addr} from {local}: {e}"))
}

/// A peer that is welcomed, then sends batches the daemon nacks and never reads the
/// nacks, with a small receive buffer so that the daemon's writes stall soon. Runs
/// until the daemon drops the connection (a write fails) or `limit` passes; how long
/// its writes kept going, and whether the daemon dropped it.
pub async fn non_reading_peer(
    addr: SocketAddr,
    key: &str,
    aircraft: Uuid,
    limit: Duration,
) -> (Duration, bool) {
    let s = connect_from("127.0.0.1".parse().expect("ip"), addr, Some(4096)).await;
    let mut s = Connection::over(s);
    let welcome = tokio::time::timeout(
        Duration::from_secs(10),
        s.handshake(key, Some("non-reading peer")),
    )
    .await;
    assert!(matches!(welcome, Ok(Ok(_))), "not welcomed: {welcome:?}");
    let started = Instant::now();
    let mut seq = 0u64;
    let mut chunk = Vec::new();
    while started.elapsed() < limit {
        chunk.clear();
        for _ in 0..64 {
            seq += 1;
            chunk.extend_from_slice(&nacked_batch(seq, aircraft));
        }
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, s.write_all(&chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return (started.elapsed(), true),
            Err(_) => break,
        }
    }
    (started.elapsed(), false)
}

/// One server frame read off a socket (within 10 s), or `None`. For a single answer (a
/// `welcome`, an `error`): anything the daemon sent after that frame is discarded.
pub async fn read_server_frame(s: &mut TcpStream) -> Option<ServerMessage> {
    let mut conn = Connection::over(s);
    tokio::time::timeout(Duration::from_secs(10), conn.read_message())
        .await
        .ok()?
        .ok()
}

/// Writes to the telemetry tables wait while this lives: a transaction holds
/// `EXCLUSIVE` locks on `flight_telemetry` (and so its partitions) and
/// `flight_sessions`, which block the batcher's COPY and session upserts but not the
/// reads of the listener's ownership checks. Dropping it without [`WriteStall::release`]
/// ends the transaction when the client goes.
pub struct WriteStall {
    client: Client,
}

impl WriteStall {
    /// Takes the locks over a fresh connection `client`.
    pub async fn begin(client: Client) -> WriteStall {
        client
            .batch_execute(
                "BEGIN; LOCK TABLE dbx_aviation.flight_telemetry, dbx_aviation.flight_sessions \
                 IN EXCLUSIVE MODE",
            )
            .await
            .expect("lock the telemetry tables");
        WriteStall { client }
    }

    /// Lets the writes through.
    pub async fn release(self) {
        self.client.batch_execute("COMMIT").await.expect("commit");
    }
}

/// The processes of a PostgreSQL cluster: the postmaster (from `postmaster.pid` in
/// `pgdata`) and its children.
fn cluster_pids(cluster_dir: &std::path::Path) -> Vec<i32> {
    let pid_file = cluster_dir.join("pgdata/postmaster.pid");
    let text = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()));
    let postmaster: i32 = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("a pid in postmaster.pid");
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid …: comm may hold spaces, so read after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

/// Stops (SIGSTOP) or continues (SIGCONT) every process of the cluster in
/// `cluster_dir`: PostgreSQL paused as a whole, as by a hung host.
pub fn pause_cluster(cluster_dir: &std::path::Path, paused: bool) {
    let sig = if paused { libc::SIGSTOP } else { libc::SIGCONT };
    let mut pids = cluster_pids(cluster_dir);
    if !paused {
        pids.reverse();
    }
    for pid in pids {
        // SAFETY: kill(2) on processes of the cluster this test process started.
        unsafe { libc::kill(pid, sig) };
    }
}
