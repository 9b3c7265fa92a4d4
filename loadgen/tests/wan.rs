//! `loadgen wan`, the UDP impairment proxy, as a process: a UDP echo server in the test sits
//! upstream, the test sends datagrams through the proxy and counts what comes back, and the
//! proxy's own totals must account for every datagram. Then the whole path through it:
//! `loadgen e2e-latency` with the proxy between the real agent and the real core, under loss
//! and an outage, must still store every record at the core exactly once.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{BIN, ResultLine, run_ok, sibling_bin};

/// An echo server on an ephemeral loopback port, answering until the test ends.
fn echo_server() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    addr
}

/// Starts `loadgen wan … --upstream UP --seconds SECS`; returns the child and where it listens.
fn start_proxy(
    upstream: SocketAddr,
    secs: u64,
    extra: &[&str],
) -> (Child, SocketAddr, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(BIN)
        .args(["wan", "--upstream", &upstream.to_string(), "--seconds", &secs.to_string()])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting loadgen wan");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .strip_prefix("wan: listening on ")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .parse()
        .unwrap();
    (child, addr, out)
}

/// Waits for the proxy to end by itself and returns its RESULT line.
fn finish(mut child: Child, mut out: BufReader<std::process::ChildStdout>) -> ResultLine {
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}\n{rest}");
    ResultLine::of(&rest)
}

/// Sends `n` numbered datagrams, `gap` apart, and collects the echoes until `wait` after the last.
fn ping(proxy: SocketAddr, n: u32, gap: Duration, wait: Duration) -> Vec<(u32, Duration)> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(proxy).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut sent_at = Vec::new();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    let mut drain = |got: &mut Vec<(u32, Duration)>, sent_at: &[Instant]| {
        while let Ok(len) = sock.recv(&mut buf) {
            let i = u32::from_le_bytes(buf[..4].try_into().unwrap());
            assert_eq!(len, 64, "an echo of a 64-byte datagram");
            got.push((i, sent_at[i as usize].elapsed()));
        }
    };
    for i in 0..n {
        let mut d = [0u8; 64];
        d[..4].copy_from_slice(&i.to_le_bytes());
        sent_at.push(Instant::now());
        sock.send(&d).unwrap();
        thread::sleep(gap);
        drain(&mut got, &sent_at);
    }
    let end = Instant::now() + wait;
    while Instant::now() < end {
        drain(&mut got, &sent_at);
        thread::sleep(Duration::from_millis(1));
    }
    got
}

#[test]
fn loss_is_applied_each_way_and_every_datagram_is_accounted_for() {
    let echo = echo_server();
    let (child, proxy, out) = start_proxy(echo, 4, &["--loss", "10", "--seed", "3"]);
    let got = ping(proxy, 1000, Duration::from_micros(500), Duration::from_millis(500));
    let r = finish(child, out);
    assert_eq!(r.num("up_offered"), 1000);
    assert_eq!(r.num("up_delivered") + r.num("up_lost"), 1000);
    assert_eq!(r.num("down_offered"), r.num("up_delivered"), "the echo server answered every delivered datagram");
    assert_eq!(r.num("down_delivered") + r.num("down_lost"), r.num("down_offered"));
    assert_eq!(got.len() as u64, r.num("down_delivered"), "every delivered echo reached the client");
    // 10% each way: about 19% of round trips lost.
    assert!((700..=900).contains(&got.len()), "{} of 1000 came back", got.len());
    assert_eq!((r.num("sessions"), r.num("refused_sessions"), r.num("overflow")), (1, 0, 0));
}

#[test]
fn delay_holds_every_datagram_each_way() {
    let echo = echo_server();
    let (child, proxy, out) = start_proxy(echo, 3, &["--delay", "30ms", "--jitter", "5ms"]);
    let got = ping(proxy, 50, Duration::from_millis(2), Duration::from_millis(300));
    finish(child, out);
    assert_eq!(got.len(), 50, "no loss configured");
    // A lower bound only: the proxy must hold each datagram at least delay - jitter each way.
    assert!(got.iter().all(|&(_, rtt)| rtt >= Duration::from_millis(50)), "{got:?}");
}

#[test]
fn nothing_passes_during_an_outage_and_traffic_resumes_after_it() {
    let echo = echo_server();
    let (child, proxy, out) = start_proxy(echo, 3, &["--outage", "1s@0s"]);
    let during = ping(proxy, 20, Duration::from_millis(10), Duration::from_millis(100));
    thread::sleep(Duration::from_millis(1000));
    let after = ping(proxy, 20, Duration::from_millis(10), Duration::from_millis(100));
    let r = finish(child, out);
    assert!(during.is_empty(), "{during:?}");
    assert_eq!(after.len(), 20);
    assert_eq!(r.num("up_outage"), 20);
}

#[test]
fn bad_settings_are_refused_naming_the_option() {
    for (args, want) in [
        (vec!["--loss", "150"], "loss"),
        (vec!["--rate", "0"], "rate"),
        (vec!["--outage", "30s"], "LENGTH@START"),
        (vec!["--delay", "fast"], "delay"),
    ] {
        let o = Command::new(BIN).args(["wan", "--upstream", "127.0.0.1:9"]).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// The real pipeline through the proxy: Mosquitto → edge-agent → WAN (1% loss, a 3 s outage)
/// → core-ingest. Every record must be stored at the core once.
#[test]
fn records_cross_a_lossy_wan_with_an_outage_exactly_once() {
    let (agent, core) = (sibling_bin("edge-agent"), sibling_bin("core-ingest"));
    let stdout = run_ok(&[
        "e2e-latency",
        "--rate",
        "200",
        "--seconds",
        "5",
        "--publishers",
        "2",
        "--wan-loss",
        "1",
        "--wan-delay",
        "10ms",
        "--wan-outage",
        "3s@2s",
        "--agent-bin",
        agent.to_str().unwrap(),
        "--core-bin",
        core.to_str().unwrap(),
    ]);
    let r = ResultLine::of(&stdout);
    for key in ["records", "published", "appended", "acked", "core_verified_records"] {
        assert_eq!(r.num(key), 1000, "{key}: {r:?}");
    }
    assert_eq!(r.num("forwarded_acked"), r.num("edge_batches"), "{r:?}");
    assert_eq!(r.num("core_stored"), r.num("edge_batches"), "{r:?}");
    for key in ["duplicates", "agent_exit", "core_exit", "agent_verify_exit", "core_verify_exit"] {
        assert_eq!(r.num(key), 0, "{key}: {r:?}");
    }
    let wan = stdout.lines().find_map(|l| l.strip_prefix("WAN ")).unwrap_or_else(|| panic!("no WAN line\n{stdout}"));
    let wan = ResultLine::of(&format!("RESULT {wan}"));
    assert!(wan.num("up_outage") > 0, "the outage hit traffic: {wan:?}");
    assert!(wan.num("up_lost") + wan.num("down_lost") > 0, "loss hit traffic: {wan:?}");
}

#[test]
fn tcp_mode_refuses_datagram_impairments() {
    let o = Command::new(BIN).args(["wan", "--tcp", "--upstream", "127.0.0.1:9", "--loss", "1"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--loss applies to UDP datagrams"));
}
