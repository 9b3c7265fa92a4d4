//! `core-ingest certs init` / `certs issue` write a CA and certificates that work: file modes,
//! refusals, then a rustls handshake in memory and a real QUIC handshake with quinn on
//! loopback, both yielding the edge id from the client certificate.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use shared::tls::{self, ALPN_ACCEPTED, ALPN_V1};

const BIN: &str = env!("CARGO_BIN_EXE_core-ingest");
const EDGE: &str = "edge-lyon-01";
/// A TLS 1.3 handshake takes two round trips; a few more cover the session tickets.
const HANDSHAKE_ROUNDS_MAX: usize = 8;
/// Generous: a loopback handshake takes milliseconds.
const QUIC_TIMEOUT: Duration = Duration::from_secs(10);

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `certs init` for localhost and 127.0.0.1, then `certs issue` for [`EDGE`], in `dir`.
fn init_and_issue(dir: &Path) {
    let d = dir.to_str().unwrap();
    let o = run(&["certs", "init", "--dir", d, "--name", "localhost", "--name", "127.0.0.1"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = run(&["certs", "issue", "--dir", d, "--edge-id", EDGE, "--days", "30"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn read(path: &Path) -> Vec<u8> {
    tls::load_pem_file(path).unwrap()
}

fn server_config(dir: &Path) -> ServerConfig {
    tls::server_config(
        &read(&dir.join("ca.pem")),
        &read(&dir.join("server.pem")),
        &read(&dir.join("server.key")),
        ALPN_ACCEPTED,
    )
    .unwrap()
}

fn client_config(dir: &Path, edge: &str) -> ClientConfig {
    let edges = dir.join("edges");
    tls::client_config(
        &read(&dir.join("ca.pem")),
        &read(&edges.join(format!("{edge}.pem"))),
        &read(&edges.join(format!("{edge}.key"))),
        &[ALPN_V1],
    )
    .unwrap()
}

#[test]
fn init_and_issue_write_private_keys_and_refuse_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let d = dir.to_str().unwrap();
    let o = run(&["certs", "init", "--dir", d, "--name", "core-1.example", "--name", "10.0.0.7"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("server.key"), "{}", text(&o.stdout));
    assert_eq!(mode(&dir), 0o700);
    for key in ["ca.key", "server.key"] {
        assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
    }
    assert!(dir.join("ca.pem").is_file() && dir.join("server.pem").is_file());

    let o = run(&["certs", "init", "--dir", d, "--name", "core-1.example"]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(err.contains(&format!("{}: already exists", dir.join("ca.pem").display())), "{err}");

    let o = run(&["certs", "issue", "--dir", d, "--edge-id", EDGE]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    let (cert, key) = (dir.join("edges").join(format!("{EDGE}.pem")), dir.join("edges").join(format!("{EDGE}.key")));
    assert!(cert.is_file());
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&dir.join("edges")), 0o700);
    for line in [
        format!("cert_file = \"{}\"", cert.display()),
        format!("key_file = \"{}\"", key.display()),
        format!("ca_file = \"{}\"", dir.join("ca.pem").display()),
    ] {
        assert!(out.lines().any(|l| l == line), "{line} not in:\n{out}");
    }

    let o = run(&["certs", "issue", "--dir", d, "--edge-id", EDGE]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains(&format!("{}: already exists", cert.display())), "{}", text(&o.stderr));

    for bad in ["", "a/b", "edge\u{7}", &"e".repeat(65)] {
        let o = run(&["certs", "issue", "--dir", d, "--edge-id", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", text(&o.stderr));
    }
    let o = run(&["certs", "issue", "--dir", tmp.path().to_str().unwrap(), "--edge-id", EDGE]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("ca.pem"), "{}", text(&o.stderr));
    let o = run(&["certs", "init", "--dir", tmp.path().join("b").to_str().unwrap(), "--name", "core 1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!tmp.path().join("b").exists(), "nothing is written when a check fails");
}

#[test]
fn written_certs_complete_a_tls_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    init_and_issue(tmp.path());
    let name = ServerName::try_from("localhost").unwrap();
    let mut c = Connection::from(ClientConnection::new(Arc::new(client_config(tmp.path(), EDGE)), name).unwrap());
    let mut s = Connection::from(ServerConnection::new(Arc::new(server_config(tmp.path()))).unwrap());
    for _ in 0..HANDSHAKE_ROUNDS_MAX {
        transfer(&mut c, &mut s);
        transfer(&mut s, &mut c);
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking(), "handshake did not finish");
    assert_eq!(s.alpn_protocol(), Some(ALPN_V1));
    let certs = s.peer_certificates().expect("client certificate required");
    assert_eq!(tls::peer_edge_id(&certs[0]).unwrap(), EDGE);
}

#[test]
fn server_and_issue_out_renew_from_the_same_ca_and_refuse_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    init_and_issue(tmp.path());
    let renew = tmp.path().join("renew");
    let (d, r) = (tmp.path().to_str().unwrap(), renew.to_str().unwrap());
    let o = run(&["certs", "server", "--dir", d, "--out", r, "--name", "localhost", "--days", "20"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = run(&["certs", "issue", "--dir", d, "--edge-id", EDGE, "--days", "10", "--out", r]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!((mode(&renew.join("server.key")), mode(&renew.join(format!("{EDGE}.key")))), (0o600, 0o600));
    for (old, new) in [
        (tmp.path().join("server.pem"), renew.join("server.pem")),
        (tmp.path().join(format!("edges/{EDGE}.pem")), renew.join(format!("{EDGE}.pem"))),
    ] {
        assert_ne!(tls::pem_serial(&read(&old)).unwrap(), tls::pem_serial(&read(&new)).unwrap(), "{}", new.display());
    }
    // The renewed pair works with the CA everyone already trusts.
    let ca = read(&tmp.path().join("ca.pem"));
    let server =
        tls::server_config(&ca, &read(&renew.join("server.pem")), &read(&renew.join("server.key")), ALPN_ACCEPTED)
            .unwrap();
    let edge_pem = renew.join(format!("{EDGE}.pem"));
    let client =
        tls::client_config(&ca, &read(&edge_pem), &read(&renew.join(format!("{EDGE}.key"))), &[ALPN_V1]).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut c = Connection::from(ClientConnection::new(Arc::new(client), name).unwrap());
    let mut s = Connection::from(ServerConnection::new(Arc::new(server)).unwrap());
    for _ in 0..HANDSHAKE_ROUNDS_MAX {
        transfer(&mut c, &mut s);
        transfer(&mut s, &mut c);
    }
    assert!(!c.is_handshaking() && !s.is_handshaking(), "handshake did not finish");
    assert_eq!(tls::peer_edge_id(&s.peer_certificates().unwrap()[0]).unwrap(), EDGE);
    // Nothing is overwritten.
    let o = run(&["certs", "server", "--dir", d, "--out", r, "--name", "localhost"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("already exists"), "{}", text(&o.stderr));
}

fn transfer(from: &mut Connection, to: &mut Connection) {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets().unwrap();
    }
}

#[tokio::test]
async fn quinn_handshake_yields_the_edge_id_and_refuses_a_foreign_ca() {
    let tmp = tempfile::tempdir().unwrap();
    init_and_issue(tmp.path());
    let server_crypto = QuicServerConfig::try_from(server_config(tmp.path())).unwrap();
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(server_crypto)),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let client = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();

    // An edge with a certificate from this CA: the core reads its id from the certificate.
    let quic_client = |tls: ClientConfig| quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let connecting = client.connect_with(quic_client(client_config(tmp.path(), EDGE)), addr, "localhost").unwrap();
    let (accepted, connected) = tokio::time::timeout(QUIC_TIMEOUT, async {
        let incoming = server.accept().await.expect("endpoint open");
        tokio::join!(incoming, connecting)
    })
    .await
    .expect("handshake timed out");
    let (accepted, connected) = (accepted.unwrap(), connected.unwrap());
    let identity = accepted.peer_identity().expect("client certificate required");
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().expect("rustls peer identity");
    assert_eq!(tls::peer_edge_id(&certs[0]).unwrap(), EDGE);
    assert_eq!(
        accepted
            .handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap()
            .protocol
            .as_deref(),
        Some(ALPN_V1)
    );
    connected.close(0u32.into(), b"done");

    // An edge whose certificate comes from another CA is refused by the core.
    let other = tmp.path().join("other");
    init_and_issue(&other);
    let connecting = client
        .connect_with(
            quic_client(
                tls::client_config(
                    &read(&tmp.path().join("ca.pem")),
                    &read(&other.join("edges").join(format!("{EDGE}.pem"))),
                    &read(&other.join("edges").join(format!("{EDGE}.key"))),
                    &[ALPN_V1],
                )
                .unwrap(),
            ),
            addr,
            "localhost",
        )
        .unwrap();
    let (accepted, client_side) = tokio::time::timeout(QUIC_TIMEOUT, async {
        let incoming = server.accept().await.expect("endpoint open");
        // In TLS 1.3 the client may finish its side before the server checks its certificate:
        // then the refusal arrives as the connection's close.
        let client_side = async {
            match connecting.await {
                Ok(conn) => conn.closed().await,
                Err(e) => e,
            }
        };
        tokio::join!(incoming, client_side)
    })
    .await
    .expect("refusal timed out");
    let server_error = accepted.expect_err("a certificate from another CA must be refused");
    // The TLS alert unknown_ca (48), carried as a QUIC CRYPTO_ERROR (RFC 9001 §4.8).
    let unknown_ca = quinn::TransportErrorCode::crypto(48);
    assert!(
        matches!(&server_error, quinn::ConnectionError::TransportError(e) if e.code == unknown_ca),
        "{server_error:?}"
    );
    assert!(
        matches!(&client_side, quinn::ConnectionError::ConnectionClosed(c) if c.error_code == unknown_ca),
        "{client_side:?}"
    );
    server.close(0u32.into(), b"done");
    client.wait_idle().await;
}
