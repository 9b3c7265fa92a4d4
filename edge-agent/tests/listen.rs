//! Listen mode with real clients: `mosquitto_pub` / `mosquitto_sub` (3.1.1 and 5, TCP and TLS),
//! rumqttc (1,000 concurrent clients), and a raw client built on rumqttc's `mqttbytes` that can
//! send exactly the bytes a test needs (DUP resends with a chosen packet id, oversized packets,
//! garbage). The agent is the real binary; the log is read through `shared::log`.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{Agent, BIN, Pki, free_port, id_counts, id_of, payload, read_stream};

const USER: &str = "dev";
const PASSWORD: &str = "device-secret";

/// A password hash made by `edge-agent passwd` (the command an operator runs).
fn password_hash() -> String {
    let mut child = Command::new(BIN)
        .args(["passwd", "--iterations", "10000"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running edge-agent passwd");
    child.stdin.take().expect("stdin").write_all(PASSWORD.as_bytes()).expect("writing the password");
    let out = child.wait_with_output().expect("edge-agent passwd");
    assert!(out.status.success(), "edge-agent passwd: {}", String::from_utf8_lossy(&out.stderr));
    let hash = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    assert!(hash.starts_with("pbkdf2-sha256$10000$"), "{hash}");
    hash
}

/// `[listen]` on a free TCP port (and `extra` lines), a user, and a JSON `cdr` stream.
fn listen_toml(tcp: SocketAddr, extra: &str) -> String {
    format!(
        "[listen]\ntcp = [\"{tcp}\"]\nconnect_timeout = \"1s\"\npacket_bytes_max = \"4KiB\"\ninflight_max = 50\n{extra}\n\
         [[listen.user]]\nname = \"{USER}\"\npassword_hash = \"{}\"\n\n\
         [[route]]\nfilter = \"cdr/#\"\nstream = \"cdr\"\n\n[streams.cdr]\nformat = \"json\"\nfsync_interval = \"5ms\"\n",
        password_hash()
    )
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn mosquitto_pub(args: &[&str]) -> Output {
    Command::new("mosquitto_pub").args(args).output().expect("mosquitto_pub is installed (.ci/run installs it)")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

// ---- a raw client --------------------------------------------------------------------------

/// What the agent sent back.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Got {
    ConnAck { code: u8, present: bool },
    PubAck { pkid: u16, code: u8 },
    PubRec { pkid: u16, code: u8 },
    PubComp { pkid: u16, code: u8 },
    SubAck { codes: Vec<u8> },
    Disconnect { code: u8 },
    Closed,
}

/// One MQTT connection over a blocking socket, packets from rumqttc's `mqttbytes`.
struct Raw {
    s: TcpStream,
    buf: BytesMut,
    v5: bool,
}

impl Raw {
    fn tcp(addr: SocketAddr, v5: bool) -> Raw {
        let s = TcpStream::connect(addr).expect("connecting to the agent");
        s.set_nodelay(true).expect("nodelay");
        Raw { s, buf: BytesMut::new(), v5 }
    }

    /// Connects and returns the CONNACK (MQTT 5: session expiry 600 s).
    fn connect(addr: SocketAddr, v5: bool, id: &str, password: &str, clean: bool) -> (Raw, Got) {
        Raw::connect_expiring(addr, v5, id, password, clean, 600)
    }

    /// [`Raw::connect`] with an MQTT 5 session expiry interval, s.
    fn connect_expiring(addr: SocketAddr, v5: bool, id: &str, password: &str, clean: bool, expiry: u32) -> (Raw, Got) {
        Raw::connect_full(addr, v5, id, password, clean, expiry, None)
    }

    /// [`Raw::connect`] with a Will: topic, payload, MQTT 5 Will Delay Interval (s).
    fn connect_will(addr: SocketAddr, v5: bool, id: &str, will: (&str, &[u8], u32)) -> (Raw, Got) {
        Raw::connect_full(addr, v5, id, PASSWORD, true, 600, Some(will))
    }

    fn connect_full(
        addr: SocketAddr,
        v5: bool,
        id: &str,
        password: &str,
        clean: bool,
        expiry: u32,
        will: Option<(&str, &[u8], u32)>,
    ) -> (Raw, Got) {
        let mut r = Raw::tcp(addr, v5);
        let mut out = BytesMut::new();
        if v5 {
            use rumqttc::v5::mqttbytes::QoS;
            use rumqttc::v5::mqttbytes::v5::{Connect, ConnectProperties, LastWill, LastWillProperties, Login, Packet};
            let mut props = ConnectProperties::new();
            props.session_expiry_interval = Some(expiry);
            let c = Connect { keep_alive: 30, client_id: id.into(), clean_start: clean, properties: Some(props) };
            let will = will.map(|(topic, payload, delay)| {
                let properties = LastWillProperties {
                    delay_interval: Some(delay),
                    payload_format_indicator: None,
                    message_expiry_interval: None,
                    content_type: None,
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                };
                LastWill::new(topic, payload.to_vec(), QoS::AtLeastOnce, false, Some(properties))
            });
            Packet::Connect(c, will, Some(Login::new(USER, password))).write(&mut out, None).expect("CONNECT");
        } else {
            use rumqttc::mqttbytes::QoS;
            use rumqttc::mqttbytes::v4::{Connect, LastWill};
            let mut c = Connect::new(id);
            c.clean_session = clean;
            c.keep_alive = 30;
            c.set_login(USER, password);
            c.last_will =
                will.map(|(topic, payload, _)| LastWill::new(topic, payload.to_vec(), QoS::AtLeastOnce, false));
            c.write(&mut out).expect("CONNECT");
        }
        r.send(&out);
        let ack = r.read(Duration::from_secs(10));
        (r, ack)
    }

    fn send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    fn publish(&mut self, qos: u8, pkid: u16, dup: bool, topic: &str, body: &[u8]) {
        let mut out = BytesMut::new();
        if self.v5 {
            use rumqttc::v5::mqttbytes::{QoS, v5::Packet, v5::Publish};
            let q = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][usize::from(qos)];
            let mut p = Publish::new(topic, q, Bytes::copy_from_slice(body), None);
            p.pkid = pkid;
            p.dup = dup;
            Packet::Publish(p).write(&mut out, None).expect("PUBLISH");
        } else {
            use rumqttc::mqttbytes::{QoS, v4::Publish};
            let q = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][usize::from(qos)];
            let mut p = Publish::new(topic, q, body.to_vec());
            p.pkid = pkid;
            p.dup = dup;
            p.write(&mut out).expect("PUBLISH");
        }
        self.send(&out);
    }

    /// MQTT 5 DISCONNECT with reason `code` alone (0x00 normal, 0x04 with Will), as paho and
    /// mosquitto send it (rumqttc 0.25 writes a byte more than its remaining length says).
    fn disconnect_v5(&mut self, code: u8) {
        self.send(&[0xE0, 0x01, code]);
    }

    fn pubrel(&mut self, pkid: u16) {
        let mut out = BytesMut::new();
        if self.v5 {
            use rumqttc::v5::mqttbytes::v5::{Packet, PubRel};
            Packet::PubRel(PubRel::new(pkid, None)).write(&mut out, None).expect("PUBREL");
        } else {
            rumqttc::mqttbytes::v4::PubRel::new(pkid).write(&mut out).expect("PUBREL");
        }
        self.send(&out);
    }

    fn subscribe(&mut self, pkid: u16, filter: &str) {
        let mut out = BytesMut::new();
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Subscribe};
        let mut s = Subscribe::new(Filter::new(filter, QoS::AtLeastOnce), None);
        s.pkid = pkid;
        Packet::Subscribe(s).write(&mut out, None).expect("SUBSCRIBE");
        self.send(&out);
    }

    /// The next packet from the agent, or `Closed` (EOF, error or nothing within `timeout`).
    fn read(&mut self, timeout: Duration) -> Got {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(g) = self.decode() {
                return g;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Got::Closed;
            }
            self.s.set_read_timeout(Some(left)).expect("read timeout");
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return Got::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn decode(&mut self) -> Option<Got> {
        if self.v5 {
            use rumqttc::v5::mqttbytes::v5::Packet as P;
            Some(match P::read(&mut self.buf, None).ok()? {
                P::ConnAck(a) => Got::ConnAck { code: connack_code_v5(a.code), present: a.session_present },
                P::PubAck(a) => Got::PubAck { pkid: a.pkid, code: puback_code_v5(a.reason) },
                P::PubRec(a) => Got::PubRec { pkid: a.pkid, code: pubrec_code_v5(a.reason) },
                P::PubComp(a) => Got::PubComp {
                    pkid: a.pkid,
                    code: match a.reason {
                        rumqttc::v5::mqttbytes::v5::PubCompReason::Success => 0,
                        rumqttc::v5::mqttbytes::v5::PubCompReason::PacketIdentifierNotFound => 0x92,
                    },
                },
                P::SubAck(a) => Got::SubAck { codes: a.return_codes.iter().map(|c| suback_code_v5(*c)).collect() },
                P::Disconnect(d) => Got::Disconnect { code: d.reason_code as u8 },
                other => panic!("unexpected packet {other:?}"),
            })
        } else {
            use rumqttc::mqttbytes::v4::Packet as P;
            Some(match P::read(&mut self.buf, 1 << 20).ok()? {
                P::ConnAck(a) => Got::ConnAck { code: a.code as u8, present: a.session_present },
                P::PubAck(a) => Got::PubAck { pkid: a.pkid, code: 0 },
                P::PubRec(a) => Got::PubRec { pkid: a.pkid, code: 0 },
                P::PubComp(a) => Got::PubComp { pkid: a.pkid, code: 0 },
                P::SubAck(a) => Got::SubAck {
                    codes: a
                        .return_codes
                        .iter()
                        .map(|c| match c {
                            rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure => 0x80,
                            rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(q) => *q as u8,
                        })
                        .collect(),
                },
                other => panic!("unexpected packet {other:?}"),
            })
        }
    }
}

fn connack_code_v5(c: rumqttc::v5::mqttbytes::v5::ConnectReturnCode) -> u8 {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    match c {
        C::Success => 0,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::QuotaExceeded => 0x97,
        C::ClientIdentifierNotValid => 0x85,
        C::TopicNameInvalid => 0x90,
        _ => 0x80,
    }
}

fn puback_code_v5(r: rumqttc::v5::mqttbytes::v5::PubAckReason) -> u8 {
    use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
    match r {
        R::Success => 0,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn pubrec_code_v5(r: rumqttc::v5::mqttbytes::v5::PubRecReason) -> u8 {
    use rumqttc::v5::mqttbytes::v5::PubRecReason as R;
    match r {
        R::Success => 0,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn suback_code_v5(c: rumqttc::v5::mqttbytes::v5::SubscribeReasonCode) -> u8 {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as S;
    match c {
        S::NotAuthorized => 0x87,
        S::Success(q) => q as u8,
        _ => 0x80,
    }
}

fn cdr(id: u64) -> Vec<u8> {
    payload(id, 0, 250, false)
}

fn stored_ids(data: &Path) -> HashMap<u64, u32> {
    id_counts(&read_stream(data, "cdr"))
}

// ---- tests ---------------------------------------------------------------------------------

#[test]
fn mosquitto_clients_publish_qos_0_1_2_over_3_1_1_and_5_and_subscribe_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let l = addr();
    let agent = Agent::start(&listen_toml(l, ""), data.path());
    let port = l.port().to_string();
    let mut id = 0;
    for v in ["mqttv311", "mqttv5"] {
        for q in ["0", "1", "2"] {
            id += 1;
            let body = String::from_utf8(cdr(id)).unwrap();
            let args = ["-V", v, "-h", "127.0.0.1", "-p", &port, "-u", USER, "-P", PASSWORD, "-q", q, "-t"];
            let o = mosquitto_pub(&[&args[..], &["cdr/a", "-m", &body, "-d"]].concat());
            assert!(o.status.success(), "{v} QoS {q}: {}", text(&o));
            let t = text(&o);
            match q {
                "1" => assert!(t.contains("received PUBACK"), "{t}"),
                "2" => assert!(t.contains("received PUBREC") && t.contains("received PUBCOMP"), "{t}"),
                _ => {}
            }
        }
    }
    // Not JSON on a json stream: MQTT 5 is told 0x99 (the record is dead-lettered, not lost).
    let o = mosquitto_pub(&[
        "-V",
        "mqttv5",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-u",
        USER,
        "-P",
        PASSWORD,
        "-q",
        "1",
        "-t",
        "cdr/a",
        "-m",
        "not json",
        "-d",
    ]);
    assert!(text(&o).contains("RC:153"), "{}", text(&o));
    // SUBSCRIBE: refused, the agent is not a broker.
    let o = Command::new("mosquitto_sub")
        .args(["-V", "mqttv5", "-h", "127.0.0.1", "-p", &port, "-u", USER, "-P", PASSWORD, "-t", "#", "-W", "3"])
        .output()
        .expect("mosquitto_sub");
    assert!(text(&o).contains("denied"), "{}", text(&o));
    let o = Command::new("mosquitto_sub")
        .args(["-V", "mqttv311", "-h", "127.0.0.1", "-p", &port, "-u", USER, "-P", PASSWORD, "-t", "#", "-W", "3"])
        .output()
        .expect("mosquitto_sub");
    assert!(text(&o).contains("denied"), "{}", text(&o));

    agent.wait_for("six records in cdr", Duration::from_secs(10), |a| (a.appended("cdr") >= 6).then_some(()));
    let recs = read_stream(data.path(), "cdr");
    let ids: Vec<u64> = recs.iter().filter_map(|r| id_of(&r.record.payload)).collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5, 6]);
    // QoS 1 and 2 records carry their client id and packet id (for redelivery after a restart).
    assert!(recs[1].record.attr("mqtt.pid").is_some() && recs[0].record.attr("mqtt.pid").is_none());
    assert!(recs.iter().all(|r| r.record.attr("mqtt.client").is_some()));
    let dead = read_stream(data.path(), "_deadletter");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].record.payload.as_ref(), b"not json");
    assert!(agent.metrics().contains("backhaul_edge_listen_refused_total{reason=\"0x87\"} 2"), "{}", agent.metrics());
}

#[test]
fn wrong_password_and_no_credentials_are_refused_with_their_codes() {
    let data = tempfile::tempdir().unwrap();
    let l = addr();
    let agent = Agent::start(&listen_toml(l, ""), data.path());
    let (_, ack) = Raw::connect(l, true, "d1", "wrong", true);
    assert_eq!(ack, Got::ConnAck { code: 0x86, present: false });
    let (_, ack) = Raw::connect(l, false, "d1", "wrong", true);
    assert_eq!(ack, Got::ConnAck { code: 4, present: false }, "3.1.1: bad user name or password");
    let o = mosquitto_pub(&["-V", "mqttv5", "-h", "127.0.0.1", "-p", &l.port().to_string(), "-t", "cdr/a", "-m", "{}"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("Not authorized"), "{}", text(&o));
    let (mut ok, ack) = Raw::connect(l, true, "d1", PASSWORD, true);
    assert_eq!(ack, Got::ConnAck { code: 0, present: false });
    ok.publish(1, 1, false, "cdr/a", &cdr(1));
    assert_eq!(ok.read(Duration::from_secs(5)), Got::PubAck { pkid: 1, code: 0 });
    assert_eq!(stored_ids(data.path()).len(), 1, "only the authenticated device's message");
    let m = agent.metrics();
    assert!(m.contains("backhaul_edge_listen_refused_total{reason=\"0x86\"} 2"), "{m}");
}

#[test]
fn tls_with_a_client_certificate_and_with_a_password() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let (l, t) = (addr(), addr());
    let extra = format!(
        "tls = [\"{t}\"]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca_file.display()
    );
    let _agent = Agent::start(&listen_toml(l, &extra), data.path());
    let port = t.port().to_string();
    let ca = pki.ca_file.display().to_string();
    let (cert, key) = (pki.edge_cert.display().to_string(), pki.edge_key.display().to_string());
    let base = ["-h", "localhost", "-p", &port, "--cafile", &ca, "-q", "1", "-t", "cdr/tls"];
    // A certificate chained to client_ca_file is enough: no password.
    let body = String::from_utf8(cdr(1)).unwrap();
    let o = mosquitto_pub(&[&base[..], &["--cert", &cert, "--key", &key, "-m", &body, "-V", "mqttv5"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    // With a certificate and a password, the password must be right too.
    let body = String::from_utf8(cdr(2)).unwrap();
    let with_pw = ["--cert", &cert, "--key", &key, "-u", USER, "-P", PASSWORD, "-m", &body, "-V", "mqttv311"];
    let o = mosquitto_pub(&[&base[..], &with_pw[..]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let bad_pw = ["--cert", &cert, "--key", &key, "-u", USER, "-P", "nope", "-m", "{}", "-V", "mqttv5"];
    let o = mosquitto_pub(&[&base[..], &bad_pw[..]].concat());
    assert!(!o.status.success() && text(&o).contains("Bad User Name or Password"), "{}", text(&o));
    // Without a certificate the handshake fails.
    let o = mosquitto_pub(&[&base[..], &["-u", USER, "-P", PASSWORD, "-m", "{}"]].concat());
    assert!(!o.status.success(), "{}", text(&o));
    let ids = stored_ids(data.path());
    assert_eq!(ids.keys().copied().collect::<HashSet<_>>(), HashSet::from([1, 2]));
}

#[test]
fn oversized_packets_garbage_and_silence_close_only_their_own_connection() {
    let data = tempfile::tempdir().unwrap();
    let l = addr();
    let _agent = Agent::start(&listen_toml(l, ""), data.path());
    let (mut good, ack) = Raw::connect(l, true, "good", PASSWORD, true);
    assert_eq!(ack, Got::ConnAck { code: 0, present: false });

    // A PUBLISH above packet_bytes_max (4 KiB): DISCONNECT 0x95 (packet too large), then EOF.
    let (mut big, _) = Raw::connect(l, true, "big", PASSWORD, true);
    big.publish(1, 1, false, "cdr/a", &vec![b'x'; 8 << 10]);
    assert_eq!(big.read(Duration::from_secs(5)), Got::Disconnect { code: 0x95 });
    assert_eq!(big.read(Duration::from_secs(5)), Got::Closed);
    // 3.1.1 has no reason codes: the connection is just closed.
    let (mut big, _) = Raw::connect(l, false, "big311", PASSWORD, true);
    big.publish(1, 1, false, "cdr/a", &vec![b'x'; 8 << 10]);
    assert_eq!(big.read(Duration::from_secs(5)), Got::Closed);

    // Garbage instead of a CONNECT, and garbage after one.
    let mut junk = Raw::tcp(l, true);
    junk.send(&[0xff; 64]);
    assert_eq!(junk.read(Duration::from_secs(5)), Got::Closed);
    let (mut junk, _) = Raw::connect(l, true, "junk", PASSWORD, true);
    junk.send(&[0x30, 0x04, 0x00, 0x09, b'a', b'b']); // a PUBLISH whose topic overruns the packet
    assert_eq!(junk.read(Duration::from_secs(5)), Got::Disconnect { code: 0x81 });

    // MQTT 3.1 ("MQIsdp", level 3): CONNACK 1, unacceptable protocol level.
    let mut old = Raw::tcp(l, false);
    let mut connect = vec![0x10, 0x12, 0x00, 0x06];
    connect.extend_from_slice(b"MQIsdp");
    connect.extend_from_slice(&[0x03, 0x02, 0x00, 0x3c, 0x00, 0x04]);
    connect.extend_from_slice(b"mq31");
    old.send(&connect);
    assert_eq!(old.read(Duration::from_secs(5)), Got::ConnAck { code: 1, present: false });
    assert_eq!(old.read(Duration::from_secs(5)), Got::Closed);

    // Slowloris: a connection that never sends its CONNECT is closed after connect_timeout.
    let mut silent = Raw::tcp(l, true);
    let started = Instant::now();
    assert_eq!(silent.read(Duration::from_secs(10)), Got::Closed);
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());

    // A CONNECT cut in the middle: same.
    let mut half = Raw::tcp(l, true);
    half.send(&[0x10, 0x20, 0x00, 0x04, b'M', b'Q']);
    assert_eq!(half.read(Duration::from_secs(10)), Got::Closed);

    // Meanwhile the good connection works as before.
    good.publish(1, 7, false, "cdr/a", &cdr(7));
    assert_eq!(good.read(Duration::from_secs(5)), Got::PubAck { pkid: 7, code: 0 });
    good.publish(1, 10, false, "nowhere/x", b"{}");
    assert_eq!(good.read(Duration::from_secs(5)), Got::PubAck { pkid: 10, code: 0x10 }, "no route: not stored");
    good.subscribe(8, "#");
    assert_eq!(good.read(Duration::from_secs(5)), Got::SubAck { codes: vec![0x87] });
    good.publish(1, 9, false, "cdr/+", b"{}");
    assert_eq!(good.read(Duration::from_secs(5)), Got::Disconnect { code: 0x90 }, "a wildcard in a topic name");
    assert_eq!(stored_ids(data.path()).keys().copied().collect::<Vec<_>>(), vec![7]);
}

#[test]
fn qos2_is_stored_once_per_packet_id_across_resends_and_reconnects() {
    let data = tempfile::tempdir().unwrap();
    let l = addr();
    let _agent = Agent::start(&listen_toml(l, ""), data.path());
    for v5 in [true, false] {
        let base = if v5 { 100 } else { 200 };
        let id = if v5 { "q2-v5" } else { "q2-v311" };
        let (mut c, ack) = Raw::connect(l, v5, id, PASSWORD, false);
        assert_eq!(ack, Got::ConnAck { code: 0, present: false });
        c.publish(2, 7, false, "cdr/a", &cdr(base + 1));
        assert_eq!(c.read(Duration::from_secs(5)), Got::PubRec { pkid: 7, code: 0 });
        c.publish(2, 7, true, "cdr/a", &cdr(base + 1));
        assert_eq!(c.read(Duration::from_secs(5)), Got::PubRec { pkid: 7, code: 0 }, "a resend before PUBREL");
        // The connection drops before the PUBREL; the session keeps packet id 7 held.
        drop(c);
        std::thread::sleep(Duration::from_millis(200));
        let (mut c, ack) = Raw::connect(l, v5, id, PASSWORD, false);
        assert_eq!(ack, Got::ConnAck { code: 0, present: true });
        c.publish(2, 7, true, "cdr/a", &cdr(base + 1));
        assert_eq!(c.read(Duration::from_secs(5)), Got::PubRec { pkid: 7, code: 0 });
        c.pubrel(7);
        assert_eq!(c.read(Duration::from_secs(5)), Got::PubComp { pkid: 7, code: 0 });
        c.pubrel(7);
        let again = c.read(Duration::from_secs(5));
        assert_eq!(again, Got::PubComp { pkid: 7, code: if v5 { 0x92 } else { 0 } }, "packet id not found");
        // Released: packet id 7 is new data again.
        c.publish(2, 7, false, "cdr/a", &cdr(base + 2));
        assert_eq!(c.read(Duration::from_secs(5)), Got::PubRec { pkid: 7, code: 0 });
        // A clean start forgets the session.
        drop(c);
        std::thread::sleep(Duration::from_millis(200));
        let (_, ack) = Raw::connect(l, v5, id, PASSWORD, true);
        assert_eq!(ack, Got::ConnAck { code: 0, present: false });
    }
    let ids = stored_ids(data.path());
    for id in [101, 102, 201, 202] {
        assert_eq!(ids.get(&id), Some(&1), "id {id} in {ids:?}");
    }
    assert_eq!(ids.len(), 4);
}

/// Raises this process's soft open-files limit (the agent, a child, inherits it) so 1,000
/// clients and their 1,000 server sockets fit; `prlimit` comes with util-linux.
fn raise_nofile(want: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let (soft, hard) = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| {
            let v: Vec<&str> = l.split_whitespace().collect();
            Some((v.get(3)?.parse::<u64>().ok()?, v.get(4)?.parse::<u64>().unwrap_or(u64::MAX)))
        })
        .unwrap_or((1024, 1024));
    if soft >= want {
        return;
    }
    let target = want.min(hard);
    let pid = std::process::id().to_string();
    let _ = Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={target}:{hard}")]).status();
}

#[test]
fn a_thousand_concurrent_rumqttc_clients() {
    const CLIENTS: u64 = 1000;
    const EACH: u64 = 3;
    raise_nofile(4096);
    let data = tempfile::tempdir().unwrap();
    let l = addr();
    let _agent = Agent::start(&listen_toml(l, "connections_max = 2000\n"), data.path());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (acked, connected, release, go) = (acked.clone(), connected.clone(), release.clone(), go.clone());
            rt.spawn(async move {
                use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
                let mut o = MqttOptions::new(format!("dev-{c}"), "127.0.0.1", l.port());
                o.set_credentials(USER, PASSWORD).set_keep_alive(Duration::from_secs(60));
                let (client, mut ev) = AsyncClient::new(o, 16);
                let mut got = 0;
                let mut up = false;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                while got < EACH {
                    let e = tokio::select! {
                        e = ev.poll() => e,
                        _ = tokio::time::sleep_until(deadline) => return Err(format!("client {c}: timed out")),
                    };
                    match e {
                        Ok(Event::Incoming(Packet::ConnAck(_))) if !up => {
                            up = true;
                            connected.fetch_add(1, Ordering::SeqCst);
                            // Every client connected before any publishes: 1,000 at once.
                            let client = client.clone();
                            let (release, go) = (release.clone(), go.clone());
                            tokio::spawn(async move {
                                if !go.load(Ordering::SeqCst) {
                                    release.notified().await;
                                }
                                for i in 0..EACH {
                                    let id = 1_000_000 + c * EACH + i;
                                    let _ = client.publish("cdr/bulk", QoS::AtLeastOnce, false, cdr(id)).await;
                                }
                            });
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            got += 1;
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        Err(e) => return Err(format!("client {c}: {e}")),
                    }
                }
                Ok::<_, String>(client)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while connected.load(Ordering::SeqCst) < CLIENTS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if connected.load(Ordering::SeqCst) < CLIENTS {
        let failed: Vec<String> =
            tasks.iter().filter(|t| t.is_finished()).take(3).map(|_| "a client task ended early".to_string()).collect();
        panic!("{} of {CLIENTS} connected; {failed:?}", connected.load(Ordering::SeqCst));
    }
    go.store(true, Ordering::SeqCst);
    release.notify_waiters();
    let results: Vec<_> = rt.block_on(async { futures_join(tasks).await });
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(errors.is_empty(), "{} clients failed, e.g. {:?}", errors.len(), errors.first());
    assert_eq!(acked.load(Ordering::SeqCst), CLIENTS * EACH);
    let ids = stored_ids(data.path());
    assert_eq!(ids.len() as u64, CLIENTS * EACH);
    assert!(ids.values().all(|&n| n == 1));
}

async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<Result<T, String>>>) -> Vec<Result<T, String>> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Err(e.to_string())));
    }
    out
}

/// What one publishing device saw before the agent died.
#[derive(Debug, Default)]
struct DeviceLog {
    /// (packet id, message id) of every PUBACKed message.
    acked: Vec<(u16, u64)>,
    /// The message in flight when the connection died, if any.
    unacked: Option<(u16, u64)>,
}

#[test]
fn sigkill_while_100_devices_publish_then_every_acked_message_is_kept_and_dup_resends_are_not_stored_twice() {
    const DEVICES: u64 = 100;
    let data = tempfile::tempdir().unwrap();
    let l = addr();
    let mut agent = Agent::start(&listen_toml(l, ""), data.path());
    let logs: Vec<Arc<Mutex<DeviceLog>>> = (0..DEVICES).map(|_| Arc::default()).collect();
    let threads: Vec<_> = (0..DEVICES)
        .map(|d| {
            let log = logs[d as usize].clone();
            std::thread::spawn(move || {
                let v5 = d % 2 == 0;
                let (mut c, ack) = Raw::connect(l, v5, &format!("dev-{d}"), PASSWORD, false);
                if ack != (Got::ConnAck { code: 0, present: false }) {
                    return;
                }
                // One message in flight at a time, ids unique over the test.
                for n in 0..100_000u64 {
                    let pkid = (n % 60_000 + 1) as u16;
                    let id = d * 1_000_000 + n;
                    log.lock().unwrap().unacked = Some((pkid, id));
                    c.publish(1, pkid, false, "cdr/kill", &cdr(id));
                    match c.read(Duration::from_secs(10)) {
                        Got::PubAck { pkid: p, code: 0 } if p == pkid => {
                            let mut g = log.lock().unwrap();
                            g.acked.push((pkid, id));
                            g.unacked = None;
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect();
    // Let them publish for a while, then kill the agent mid-stream.
    agent.wait_for("1,000 acks", Duration::from_secs(30), |_| {
        (logs.iter().map(|l| l.lock().unwrap().acked.len()).sum::<usize>() >= 1000).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    agent.sigkill();
    for t in threads {
        t.join().unwrap();
    }
    let acked: Vec<u64> =
        logs.iter().flat_map(|l| l.lock().unwrap().acked.iter().map(|a| a.1).collect::<Vec<_>>()).collect();
    assert!(acked.len() >= 1000);

    // Every PUBACKed message is in the log after the restart (read by `edge-agent log dump`).
    agent.restart();
    let dump = Command::new(BIN)
        .args(["log", "dump", "--data-dir"])
        .arg(data.path())
        .args(["--stream", "cdr"])
        .output()
        .expect("edge-agent log dump");
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let mut dumped: HashMap<u64, u32> = HashMap::new();
    for line in String::from_utf8(dump.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let p = v["payload"].as_str().unwrap();
        *dumped.entry(id_of(p.as_bytes()).unwrap()).or_default() += 1;
    }
    let missing: Vec<&u64> = acked.iter().filter(|id| !dumped.contains_key(id)).collect();
    assert!(
        missing.is_empty(),
        "{} PUBACKed messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );

    // Each device comes back and resends, with DUP and the same packet id, its last acked
    // message (as if the PUBACK had been lost) and the one in flight at the kill.
    let mut resent = Vec::new();
    for d in 0..DEVICES {
        let g = logs[d as usize].lock().unwrap();
        let (mut c, ack) = Raw::connect(l, d % 2 == 0, &format!("dev-{d}"), PASSWORD, false);
        assert!(matches!(ack, Got::ConnAck { code: 0, .. }), "{ack:?}");
        for (pkid, id) in g.acked.last().copied().into_iter().chain(g.unacked) {
            c.publish(1, pkid, true, "cdr/kill", &cdr(id));
            assert_eq!(c.read(Duration::from_secs(10)), Got::PubAck { pkid, code: 0 }, "device {d} id {id}");
            resent.push(id);
        }
    }
    let ids = stored_ids(data.path());
    for id in &resent {
        assert_eq!(ids.get(id), Some(&1), "id {id} after its DUP resend");
    }
    let dup_total: u32 = ids.values().filter(|&&n| n > 1).sum();
    assert_eq!(dup_total, 0, "no message is stored twice");
}

#[test]
fn the_example_config_has_a_listen_section_that_validates() {
    const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/edge-agent.example.toml");
    let text = std::fs::read_to_string(EXAMPLE).expect("reading the example config");
    let config = edge_agent::config::Config::parse(&text, Path::new(EXAMPLE)).unwrap_or_else(|e| panic!("{e}"));
    let listen = config.listen.expect("[listen] in the example");
    assert_eq!(listen.users.len(), 1);
    let users = edge_agent::listen::auth::Users::new(&listen.users);
    assert!(users.check("meter-fleet", b"change-me"), "the example's hash is of the password its comment names");
}

#[test]
fn connections_max_and_keep_alive_are_enforced() {
    let data = tempfile::tempdir().unwrap();
    let l = addr();
    let _agent = Agent::start(&listen_toml(l, "connections_max = 1\nkeep_alive_max = \"1s\"\n"), data.path());
    let (mut first, ack) = Raw::connect(l, true, "one", PASSWORD, true);
    assert_eq!(ack, Got::ConnAck { code: 0, present: false });
    let (_, ack) = Raw::connect(l, true, "two", PASSWORD, true);
    assert_eq!(ack, Got::ConnAck { code: 0x97, present: false }, "quota exceeded");
    let (_, ack) = Raw::connect(l, false, "two", PASSWORD, true);
    assert_eq!(ack, Got::ConnAck { code: 3, present: false }, "3.1.1: server unavailable");
    // The device asked for 30 s, was granted 1 s, and says nothing: closed after 1.5 s.
    let started = Instant::now();
    assert_eq!(first.read(Duration::from_secs(10)), Got::Disconnect { code: 0x8D });
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1200) && waited < Duration::from_secs(5), "closed after {waited:?}");
    // The slot is free again once the device has gone.
    drop(first);
    std::thread::sleep(Duration::from_millis(500));
    let (_, ack) = Raw::connect(l, true, "three", PASSWORD, true);
    assert_eq!(ack, Got::ConnAck { code: 0, present: false });
}

#[test]
fn a_full_stream_refuses_mqtt5_devices_with_quota_exceeded_and_holds_3_1_1_acks() {
    let data = tempfile::tempdir().unwrap();
    let l = addr();
    // A stream budget of 16 KiB, uncompressed: about fifty 250-byte CDRs fit.
    let config = listen_toml(l, "").replace(
        "[streams.cdr]\nformat = \"json\"\n",
        "[streams.cdr]\nformat = \"json\"\nzstd_level = 0\nsegment_bytes_max = \"4KiB\"\ndisk_budget_bytes = \"16KiB\"\n",
    );
    let agent = Agent::start(&config, data.path());
    let (mut c, _) = Raw::connect(l, true, "v5-dev", PASSWORD, true);
    let (mut stored, mut refused) = (Vec::new(), Vec::new());
    for id in 1..=300u64 {
        c.publish(1, id as u16, false, "cdr/full", &cdr(id));
        match c.read(Duration::from_secs(10)) {
            Got::PubAck { code: 0, .. } => stored.push(id),
            Got::PubAck { code: 0x97, .. } => refused.push(id),
            other => panic!("id {id}: {other:?}\n{}", agent.log_tail()),
        }
        if refused.len() >= 5 {
            break;
        }
    }
    assert!(refused.len() >= 5 && !stored.is_empty(), "stored {stored:?}, refused {refused:?}");
    let ids = stored_ids(data.path());
    assert!(stored.iter().all(|id| ids.get(id) == Some(&1)), "every id acked with success is stored once");
    assert!(refused.iter().all(|id| !ids.contains_key(id)), "no refused id is stored");
    // A 3.1.1 device cannot be told: its ack waits (the message stays with the device).
    let (mut old, _) = Raw::connect(l, false, "v311-dev", PASSWORD, true);
    old.publish(1, 1, false, "cdr/full", &cdr(10_000));
    assert_eq!(old.read(Duration::from_secs(2)), Got::Closed, "no PUBACK while the stream is full");
    assert!(agent.metrics().contains("backhaul_edge_listen_refused_total{reason=\"0x97\"}"), "{}", agent.metrics());
}

#[test]
fn a_second_connection_with_the_same_client_id_takes_the_session_over() {
    let data = tempfile::tempdir().unwrap();
    let l = addr();
    let _agent = Agent::start(&listen_toml(l, ""), data.path());
    let (mut first, _) = Raw::connect(l, true, "same-id", PASSWORD, false);
    first.publish(2, 3, false, "cdr/a", &cdr(1));
    assert_eq!(first.read(Duration::from_secs(5)), Got::PubRec { pkid: 3, code: 0 });
    let (mut second, ack) = Raw::connect(l, true, "same-id", PASSWORD, false);
    assert_eq!(ack, Got::ConnAck { code: 0, present: true }, "the session moved over");
    assert_eq!(first.read(Duration::from_secs(5)), Got::Disconnect { code: 0x8E });
    // Packet id 3 is still held in the session: the resend is answered, not stored.
    second.publish(2, 3, true, "cdr/a", &cdr(1));
    assert_eq!(second.read(Duration::from_secs(5)), Got::PubRec { pkid: 3, code: 0 });
    second.pubrel(3);
    assert_eq!(second.read(Duration::from_secs(5)), Got::PubComp { pkid: 3, code: 0 });
    assert_eq!(stored_ids(data.path()).get(&1), Some(&1));
}

#[test]
fn sigterm_sends_the_last_acks_then_disconnects_devices_and_exits_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let l = addr();
    // A long linger: the message is still in its open batch when SIGTERM comes.
    let config = listen_toml(l, "").replace("fsync_interval = \"5ms\"", "fsync_interval = \"5ms\"\nlinger = \"10s\"");
    let mut agent = Agent::start(&config, data.path());
    let (mut c, _) = Raw::connect(l, true, "leaving", PASSWORD, true);
    c.publish(1, 1, false, "cdr/a", &cdr(1));
    assert_eq!(c.read(Duration::from_millis(500)), Got::Closed, "no ack before the linger");
    let status = agent.sigterm_and_wait();
    assert!(status.success(), "exit status {status}\n{}", agent.log_tail());
    assert_eq!(c.read(Duration::from_secs(5)), Got::PubAck { pkid: 1, code: 0 }, "flushed, synced, acked");
    assert_eq!(c.read(Duration::from_secs(5)), Got::Disconnect { code: 0x8B }, "server shutting down");
    assert_eq!(stored_ids(data.path()).get(&1), Some(&1));
}

#[test]
fn paho_mqtt_devices_over_3_1_1_and_5_get_their_acks_and_reason_codes() {
    const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/paho_client.py");
    let data = tempfile::tempdir().unwrap();
    let l = addr();
    let _agent = Agent::start(&listen_toml(l, ""), data.path());
    let o = Command::new("python3")
        .args([SCRIPT, &l.port().to_string(), USER, PASSWORD])
        .output()
        .expect("python3 (paho-mqtt from PyPI: .ci/run installs it)");
    assert!(o.status.success(), "{}", text(&o));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 7, "{}", text(&o));
    for line in &lines {
        let want = if line["payload"] == "not json" { 0x99 } else { 0 };
        assert_eq!(line["rc"], want, "{line}");
    }
    let recs = read_stream(data.path(), "cdr");
    let payloads: HashSet<String> =
        recs.iter().map(|r| String::from_utf8_lossy(&r.record.payload).into_owned()).collect();
    for name in ["v311", "v5"] {
        for q in 0..3 {
            assert!(payloads.contains(&format!("{{\"id\": \"{name}-q{q}\"}}")), "{name} QoS {q} in {payloads:?}");
        }
    }
    assert_eq!(recs.len(), 6);
}

#[test]
fn an_mqtt5_session_ends_after_its_expiry_interval() {
    let data = tempfile::tempdir().unwrap();
    let l = addr();
    let _agent = Agent::start(&listen_toml(l, ""), data.path());
    let (c, _) = Raw::connect_expiring(l, true, "brief", PASSWORD, false, 2);
    drop(c);
    std::thread::sleep(Duration::from_millis(500));
    let (c, ack) = Raw::connect_expiring(l, true, "brief", PASSWORD, false, 2);
    assert_eq!(ack, Got::ConnAck { code: 0, present: true }, "within the interval");
    drop(c);
    std::thread::sleep(Duration::from_millis(2600));
    let (c, ack) = Raw::connect_expiring(l, true, "brief", PASSWORD, false, 0);
    assert_eq!(ack, Got::ConnAck { code: 0, present: false }, "expired");
    drop(c);
    std::thread::sleep(Duration::from_millis(300));
    let (_, ack) = Raw::connect_expiring(l, true, "brief", PASSWORD, false, 0);
    assert_eq!(ack, Got::ConnAck { code: 0, present: false }, "expiry 0: the session ends with the connection");
}

#[test]
fn a_devices_will_is_stored_when_its_connection_fails_and_not_after_disconnect() {
    let data = tempfile::tempdir().unwrap();
    let l = addr();
    let agent = Agent::start(&listen_toml(l, ""), data.path());
    let accepted = Got::ConnAck { code: 0, present: false };
    // 3.1.1, the socket dropped without DISCONNECT: stored.
    let (r, ack) = Raw::connect_will(l, false, "w311", ("cdr/will", &cdr(101), 0));
    assert_eq!(ack, accepted);
    drop(r);
    // MQTT 5, DISCONNECT: not stored; DISCONNECT 0x04 "with Will Message": stored.
    let (mut r, ack) = Raw::connect_will(l, true, "w5-bye", ("cdr/will", &cdr(102), 0));
    assert_eq!(ack, accepted);
    r.disconnect_v5(0x00);
    assert_eq!(r.read(Duration::from_secs(5)), Got::Closed);
    drop(r);
    let (mut r, _) = Raw::connect_will(l, true, "w5-bye-will", ("cdr/will", &cdr(103), 0));
    r.disconnect_v5(0x04);
    assert_eq!(r.read(Duration::from_secs(5)), Got::Closed);
    drop(r);
    // A 3 s Will delay, and the device back within it: not stored.
    let (r, _) = Raw::connect_will(l, true, "w5-back", ("cdr/will", &cdr(104), 3));
    drop(r);
    std::thread::sleep(Duration::from_millis(500));
    let (_back, ack) = Raw::connect(l, true, "w5-back", PASSWORD, false);
    assert_eq!(ack, Got::ConnAck { code: 0, present: true });
    // A 1 s Will delay, and the device not back: stored after it.
    let (r, _) = Raw::connect_will(l, true, "w5-gone", ("cdr/will", &cdr(105), 1));
    drop(r);
    // A Will topic with a wildcard: the CONNECT is refused (0x90), nothing stored.
    let (_, ack) = Raw::connect_will(l, true, "w5-bad", ("cdr/+", &cdr(106), 0));
    assert_eq!(ack, Got::ConnAck { code: 0x90, present: false });
    // 3.1.1 has no code for it: closed without a CONNACK.
    let (_, ack) = Raw::connect_will(l, false, "w311-bad", ("cdr/#", &cdr(106), 0));
    assert_eq!(ack, Got::Closed);
    // A real client: mosquitto_pub reading lines, killed with SIGKILL after its first message.
    let port = l.port().to_string();
    let will_body = String::from_utf8(cdr(107)).unwrap();
    let mut client = Command::new("mosquitto_pub")
        .args(["-V", "mqttv5", "-h", "127.0.0.1", "-p", &port, "-u", USER, "-P", PASSWORD, "-q", "1"])
        .args(["-i", "pub-killed", "-t", "cdr/a", "-l", "--will-topic", "cdr/will", "--will-payload", &will_body])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_pub is installed (.ci/run installs it)");
    let mut stdin = client.stdin.take().expect("stdin");
    writeln!(stdin, "{}", String::from_utf8(cdr(108)).unwrap()).expect("a line to mosquitto_pub");
    stdin.flush().expect("flush");
    agent.wait_for("mosquitto_pub's message stored", Duration::from_secs(10), |_| {
        stored_ids(data.path()).contains_key(&108).then_some(())
    });
    client.kill().expect("SIGKILL mosquitto_pub");
    let _ = client.wait();

    let ids = agent.wait_for("the four Wills due", Duration::from_secs(10), |_| {
        let ids = stored_ids(data.path());
        [101, 103, 105, 107].iter().all(|i| ids.contains_key(i)).then_some(ids)
    });
    // Past the 3 s delay of the device that came back: still not stored.
    std::thread::sleep(Duration::from_secs(3));
    let ids = stored_ids(data.path()).into_iter().chain(ids).collect::<HashMap<_, _>>();
    for (id, want) in [(101, 1), (102, 0), (103, 1), (104, 0), (105, 1), (106, 0), (107, 1), (108, 1)] {
        assert_eq!(ids.get(&id).copied().unwrap_or(0), want, "id {id}: {ids:?}");
    }
    // A Will is marked, and names its device.
    let recs = read_stream(data.path(), "cdr");
    let will = recs.iter().find(|r| id_of(&r.record.payload) == Some(101)).expect("id 101");
    assert_eq!(will.record.attr("mqtt.will"), Some("1"));
    assert_eq!(will.record.attr("mqtt.client"), Some("w311"));
    let plain = recs.iter().find(|r| id_of(&r.record.payload) == Some(108)).expect("id 108");
    assert_eq!(plain.record.attr("mqtt.will"), None);
    assert!(agent.metrics().contains("backhaul_edge_listen_wills_total 4"), "{}", agent.metrics());
}

#[test]
fn a_log_that_cannot_be_written_loses_lines_not_the_agent() {
    // stderr on a full disk: every write to /dev/full fails with ENOSPC. The agent must still
    // take and acknowledge (tracing-subscriber's own report of a failed write panicked).
    let data = tempfile::tempdir().unwrap();
    let (l, admin) = (addr(), addr());
    let config = format!(
        "edge_id = \"edge-test\"\ndata_dir = \"{}\"\n\n[admin]\nlisten = \"{admin}\"\n\n{}",
        data.path().display(),
        listen_toml(l, "")
    );
    let config_path = data.path().join("edge-agent.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut agent = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create("/dev/full").unwrap())
        .spawn()
        .expect("spawning edge-agent");
    common::wait_for("the agent's /readyz", Duration::from_secs(10), String::new, || {
        if let Some(status) = agent.try_wait().unwrap() {
            panic!("edge-agent exited with {status} while its log could not be written");
        }
        common::http_get(admin, "/readyz").filter(|(code, _)| *code == 200)
    });
    let body = String::from_utf8(cdr(1)).unwrap();
    let port = l.port().to_string();
    let args =
        ["-h", "127.0.0.1", "-p", &port, "-u", USER, "-P", PASSWORD, "-q", "1", "-t", "cdr/a", "-m", &body, "-d"];
    let o = mosquitto_pub(&args);
    assert!(o.status.success() && text(&o).contains("received PUBACK"), "{}", text(&o));
    let sent = Command::new("kill").args(["-TERM", &agent.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let status =
        common::wait_for("the agent to exit", Duration::from_secs(10), String::new, || agent.try_wait().unwrap());
    assert!(status.success(), "SIGTERM with an unwritable log: {status}");
    assert_eq!(stored_ids(data.path()).get(&1), Some(&1));
}
