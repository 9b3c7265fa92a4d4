//! Mutual TLS between edge and core (DESIGN §4): rustls configs, the edge's identity, and the
//! private CA that issues both sides' certificates.
//!
//! - Trust: one private CA per deployment. The core trusts only client certificates it issued,
//!   the edge only server certificates it issued; the system roots play no part.
//! - Identity: the edge id is the subject CommonName of the client certificate, read after
//!   rustls has verified the chain ([`peer_edge_id`]); never what a message claims. Edge
//!   certificates also carry the SAN URI `urn:backhaul:edge:<id>` (percent-encoded) for other
//!   tools; this module does not read it. Extended key usages keep the roles apart: an edge
//!   certificate (clientAuth) cannot serve, a server certificate (serverAuth) cannot connect.
//! - Crypto: TLS 1.3 only (QUIC needs it), always the ring provider, named explicitly, so no
//!   process-wide default provider has to be installed and aws-lc never enters the build.
//! - Versions: ALPN names the protocol version. The core offers [`ALPN_ACCEPTED`], the current
//!   and the previous version, so edges and cores upgrade independently; an edge offers the
//!   version it speaks. To add v2: define `ALPN_V2`, set `ALPN_ACCEPTED = &[ALPN_V2, ALPN_V1]`
//!   (newest first: rustls picks the first server entry the client also offers), let the edge
//!   offer `&[ALPN_V2, ALPN_V1]`, and dispatch on the negotiated protocol; once no edge speaks
//!   v1, drop it. Under QUIC a client that offers no known version is refused (RFC 9001 §8.1).
//! - Keys: ECDSA P-256 everywhere, PKCS#8 PEM.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;
use time::OffsetDateTime;

use crate::batch::PRODUCER_LEN_MAX;

/// ALPN id of protocol version 1.
pub const ALPN_V1: &[u8] = b"backhaul/1";
/// The versions a core accepts, newest first: the current one and the previous one. Only v1
/// exists yet.
pub const ALPN_ACCEPTED: &[&[u8]] = &[ALPN_V1];
/// Prefix of the SAN URI of an edge certificate; the percent-encoded edge id follows.
pub const EDGE_URI_PREFIX: &str = "urn:backhaul:edge:";
/// Largest PEM file [`load_pem_file`] reads: a chain of a few certificates is a few KB, so
/// anything bigger is the wrong file.
pub const PEM_FILE_BYTES_MAX: u64 = 1 << 20;
/// A new certificate is valid from this long before it is made, so an edge whose clock lags a
/// little does not refuse it.
const NOT_BEFORE_SKEW_SECS: i64 = 3600;
/// Longest edge id quoted back in an error: a peer's CommonName may be long.
const ID_IN_ERROR_BYTES_MAX: usize = 80;

/// What went wrong building TLS configs, reading a peer's identity or issuing certificates.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file is larger than [`PEM_FILE_BYTES_MAX`].
    #[error("{}: larger than {PEM_FILE_BYTES_MAX} bytes, not a PEM file", path.display())]
    FileTooLarge {
        /// The file.
        path: PathBuf,
    },
    /// PEM input holds no usable item or is malformed.
    #[error("{input}: {reason}")]
    Pem {
        /// Which input: "CA certificate", "certificate", "private key".
        input: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the material, e.g. a key that does not match its certificate.
    #[error("{input}: {source}")]
    Rustls {
        /// Which input or step.
        input: &'static str,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The client certificate verifier could not be built (e.g. no usable CA certificate).
    #[error("client certificate verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// A config was asked for with no ALPN protocol: the protocol version must be named.
    #[error("no ALPN protocol given")]
    NoAlpn,
    /// The peer's certificate does not carry a usable identity.
    #[error("peer certificate: {reason}")]
    PeerCertificate {
        /// What is wrong.
        reason: String,
    },
    /// An edge id that is not a valid producer id.
    #[error("edge id {id:?}: {reason}")]
    InvalidEdgeId {
        /// The id (cut to a few dozen bytes).
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A certificate cannot be issued as asked.
    #[error("{what}: {reason}")]
    Issue {
        /// Which certificate.
        what: &'static str,
        /// Why not.
        reason: String,
    },
    /// rcgen failed to make a key or a certificate.
    #[error("{what}: {source}")]
    Generate {
        /// What was being made.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: rcgen::Error,
    },
}

/// The core's config: TLS 1.3 with the ring provider, presents `cert_pem` (leaf first, then
/// any intermediates) with `key_pem`, requires a client certificate that chains to a CA in
/// `ca_pem`, and offers `alpn` (newest first; normally [`ALPN_ACCEPTED`]).
pub fn server_config(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8], alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    check_alpn(alpn)?;
    let provider = provider();
    let roots = Arc::new(root_store(ca_pem)?);
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build().map_err(TlsError::Verifier)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls { input: "protocol versions", source })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem, "certificate")?, private_key(key_pem)?)
        .map_err(|source| TlsError::Rustls { input: "certificate and private key", source })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The edge's config: TLS 1.3 with the ring provider, trusts only the CAs in `ca_pem` (not the
/// system roots), presents `cert_pem` with `key_pem`, and offers `alpn` (newest first).
pub fn client_config(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8], alpn: &[&[u8]]) -> Result<ClientConfig, TlsError> {
    check_alpn(alpn)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls { input: "protocol versions", source })?
        .with_root_certificates(root_store(ca_pem)?)
        .with_client_auth_cert(certs(cert_pem, "certificate")?, private_key(key_pem)?)
        .map_err(|source| TlsError::Rustls { input: "certificate and private key", source })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The three PEM files of one side of the link. They are read together, so a reload after a
/// rotation (SIGHUP) builds its config from one consistent set, or fails and keeps the old one.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// CA certificate(s) the peer's certificate must chain to.
    pub ca_file: PathBuf,
    /// This side's certificate, leaf first.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
}

/// When the certificates just loaded expire (Unix seconds; for a file of several
/// certificates, the earliest): exported as metrics so an alert fires before they do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertExpiry {
    /// This side's certificate (or its chain).
    pub cert_not_after: i64,
    /// The CA file.
    pub ca_not_after: i64,
}

impl CertFiles {
    /// [`server_config`] from the files, and when they expire.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<(ServerConfig, CertExpiry), TlsError> {
        let (ca, cert, key, expiry) = self.read()?;
        Ok((server_config(&ca, &cert, &key, alpn)?, expiry))
    }

    /// [`client_config`] from the files, and when they expire.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<(ClientConfig, CertExpiry), TlsError> {
        let (ca, cert, key, expiry) = self.read()?;
        Ok((client_config(&ca, &cert, &key, alpn)?, expiry))
    }

    /// The certificate file's PEM text.
    pub fn cert_pem(&self) -> Result<Vec<u8>, TlsError> {
        load_pem_file(&self.cert_file)
    }

    #[allow(clippy::type_complexity)]
    fn read(&self) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>, CertExpiry), TlsError> {
        let ca = load_pem_file(&self.ca_file)?;
        let cert = load_pem_file(&self.cert_file)?;
        let key = load_pem_file(&self.key_file)?;
        let expiry = CertExpiry {
            cert_not_after: pem_not_after(&cert, "certificate")?,
            ca_not_after: pem_not_after(&ca, "CA certificate")?,
        };
        Ok((ca, cert, key, expiry))
    }
}

/// The earliest notAfter (Unix seconds) of the certificates in `pem`: when the first of them
/// stops being valid. `input` names the PEM in errors.
pub fn pem_not_after(pem: &[u8], input: &'static str) -> Result<i64, TlsError> {
    let mut earliest = i64::MAX;
    for der in certs(pem, input)? {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| TlsError::Pem { input, reason: format!("not an X.509 certificate: {e}") })?;
        earliest = earliest.min(cert.validity().not_after.timestamp());
    }
    Ok(earliest)
}

/// The serial number of a certificate (DER) in lower-case hex, as the core logs it for each
/// session, so an operator can tell which certificate an edge presented.
pub fn cert_serial(der: &[u8]) -> Result<String, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::PeerCertificate { reason: format!("not an X.509 certificate: {e}") })?;
    Ok(cert.tbs_certificate.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
}

/// [`cert_serial`] of the first certificate of a PEM text.
pub fn pem_serial(pem: &[u8]) -> Result<String, TlsError> {
    let first = certs(pem, "certificate")?.into_iter().next().expect("certs returns at least one");
    cert_serial(first.as_ref())
}

/// An HTTPS server's config (the core's read API): TLS 1.3 with the ring provider, presents
/// `cert_pem` with `key_pem`, no client certificate (clients authenticate with bearer tokens).
pub fn https_server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls { input: "protocol versions", source })?
        .with_no_client_auth()
        .with_single_cert(certs(cert_pem, "certificate")?, private_key(key_pem)?)
        .map_err(|source| TlsError::Rustls { input: "certificate and private key", source })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// An HTTPS client's config trusting only the CAs in `ca_pem`, without a client certificate.
pub fn https_client_config(ca_pem: &[u8]) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls { input: "protocol versions", source })?
        .with_root_certificates(root_store(ca_pem)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The edge id in a verified client certificate (DER): its subject CommonName. Refuses a
/// certificate without exactly one CommonName, or whose CommonName is not a valid edge id
/// ([`check_edge_id`]). Call it only on a certificate rustls has verified.
pub fn peer_edge_id(end_entity_der: &[u8]) -> Result<String, TlsError> {
    let peer = |reason: String| TlsError::PeerCertificate { reason };
    let (_, cert) = x509_parser::parse_x509_certificate(end_entity_der)
        .map_err(|e| peer(format!("not an X.509 certificate: {e}")))?;
    let mut names = cert.subject().iter_common_name();
    let cn = match (names.next(), names.next()) {
        (Some(cn), None) => cn,
        (None, _) => return Err(peer("subject has no CommonName".into())),
        (Some(_), Some(_)) => return Err(peer("subject has more than one CommonName".into())),
    };
    let id = cn.as_str().map_err(|e| peer(format!("CommonName is not a string: {e}")))?;
    check_edge_id(id)?;
    Ok(id.to_owned())
}

/// The edge id of the first certificate of a PEM text (the edge checks its own certificate
/// against its configured `edge_id` at start).
pub fn cert_pem_edge_id(pem: &[u8]) -> Result<String, TlsError> {
    let first = certs(pem, "certificate")?.into_iter().next().expect("certs returns at least one");
    peer_edge_id(first.as_ref())
}

/// Whether `id` can be an edge id: the producer of its batches, so 1 to
/// [`PRODUCER_LEN_MAX`] bytes of UTF-8 without control characters (the batch codec's rule).
pub fn check_edge_id(id: &str) -> Result<(), TlsError> {
    let reason = if id.is_empty() {
        "empty".to_owned()
    } else if id.len() > PRODUCER_LEN_MAX {
        format!("{} bytes, at most {PRODUCER_LEN_MAX} allowed", id.len())
    } else if id.chars().any(char::is_control) {
        "control characters".to_owned()
    } else {
        return Ok(());
    };
    Err(TlsError::InvalidEdgeId { id: cut(id, ID_IN_ERROR_BYTES_MAX), reason })
}

/// Reads a PEM file of at most [`PEM_FILE_BYTES_MAX`] bytes; errors name the file.
pub fn load_pem_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read = |source| TlsError::Read { path: path.to_owned(), source };
    let mut bytes = Vec::new();
    File::open(path).map_err(read)?.take(PEM_FILE_BYTES_MAX + 1).read_to_end(&mut bytes).map_err(read)?;
    if bytes.len() as u64 > PEM_FILE_BYTES_MAX {
        return Err(TlsError::FileTooLarge { path: path.to_owned() });
    }
    Ok(bytes)
}

/// A new self-signed CA valid for `days` from now: `(certificate PEM, private key PEM)`. It
/// may sign only end-entity certificates (path length 0).
pub fn generate_ca(common_name: &str, days: u32) -> Result<(String, String), TlsError> {
    const WHAT: &str = "CA certificate";
    if common_name.is_empty() {
        return Err(TlsError::Issue { what: WHAT, reason: "empty CommonName".into() });
    }
    let (not_before, not_after) = validity_from_now(WHAT, days)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_only(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before;
    params.not_after = not_after;
    let key = new_key()?;
    let cert = params.self_signed(&key).map_err(|source| TlsError::Generate { what: WHAT, source })?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A core's certificate, signed by the CA, valid for `days` from now, for `names` (DNS names
/// or IP addresses; edges connect to one of them; the first is also the CommonName):
/// `(certificate PEM, private key PEM)`.
pub fn issue_server_cert(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    names: &[String],
    days: u32,
) -> Result<(String, String), TlsError> {
    const WHAT: &str = "server certificate";
    let Some(first) = names.first() else {
        return Err(TlsError::Issue { what: WHAT, reason: "no DNS name or IP address given".into() });
    };
    if let Some(bad) = names.iter().find(|n| ServerName::try_from(n.as_str()).is_err()) {
        return Err(TlsError::Issue { what: WHAT, reason: format!("{bad:?} is neither a DNS name nor an IP address") });
    }
    let mut params =
        CertificateParams::new(names.to_vec()).map_err(|source| TlsError::Generate { what: WHAT, source })?;
    params.distinguished_name = common_name_only(first);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    (params.not_before, params.not_after) = validity_from_now(WHAT, days)?;
    issue(WHAT, ca_cert_pem, ca_key_pem, params)
}

/// An edge's client certificate, signed by the CA, valid for `days` from now:
/// `(certificate PEM, private key PEM)`. CommonName = `edge_id`, SAN URI
/// `urn:backhaul:edge:<id>`, extended key usage clientAuth.
pub fn issue_edge_cert(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    edge_id: &str,
    days: u32,
) -> Result<(String, String), TlsError> {
    let (not_before, not_after) = validity_from_now("edge certificate", days)?;
    issue_edge_cert_with_validity(ca_cert_pem, ca_key_pem, edge_id, not_before.into(), not_after.into())
}

/// [`issue_edge_cert`] with an explicit validity, e.g. one already over, for tests.
pub fn issue_edge_cert_with_validity(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    edge_id: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(String, String), TlsError> {
    const WHAT: &str = "edge certificate";
    check_edge_id(edge_id)?;
    let uri = format!("{EDGE_URI_PREFIX}{}", percent_encode(edge_id));
    let uri = Ia5String::try_from(uri).map_err(|source| TlsError::Generate { what: WHAT, source })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_only(edge_id);
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    issue(WHAT, ca_cert_pem, ca_key_pem, params)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn check_alpn(alpn: &[&[u8]]) -> Result<(), TlsError> {
    if alpn.is_empty() || alpn.iter().any(|p| p.is_empty()) {
        return Err(TlsError::NoAlpn);
    }
    Ok(())
}

/// Every certificate in `pem`, in order; at least one.
fn certs(pem: &[u8], input: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { input, reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { input, reason: "no CERTIFICATE in PEM".into() });
    }
    Ok(certs)
}

/// The CAs of `ca_pem`. More than one is allowed, so a new CA can be trusted before the old
/// one is retired.
fn root_store(ca_pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca_pem, "CA certificate")? {
        roots.add(cert).map_err(|source| TlsError::Rustls { input: "CA certificate", source })?;
    }
    Ok(roots)
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem { input: "private key", reason: e.to_string() })
}

fn new_key() -> Result<KeyPair, TlsError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| TlsError::Generate { what: "ECDSA P-256 key", source })
}

fn common_name_only(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn validity_from_now(what: &'static str, days: u32) -> Result<(OffsetDateTime, OffsetDateTime), TlsError> {
    if days == 0 {
        return Err(TlsError::Issue { what, reason: "validity of 0 days".into() });
    }
    let now = OffsetDateTime::now_utc();
    let not_after = now
        .checked_add(time::Duration::days(i64::from(days)))
        .filter(|t| t.year() <= 9999)
        .ok_or_else(|| TlsError::Issue { what, reason: format!("validity of {days} days reaches past year 9999") })?;
    Ok((now - time::Duration::seconds(NOT_BEFORE_SKEW_SECS), not_after))
}

/// Signs `params` with a new key by the first certificate of `ca_cert_pem` and its key
/// `ca_key_pem`, after checking that they match and that the CA outlives the new certificate.
fn issue(
    what: &'static str,
    ca_cert_pem: &str,
    ca_key_pem: &str,
    mut params: CertificateParams,
) -> Result<(String, String), TlsError> {
    let refuse = |reason: String| TlsError::Issue { what, reason };
    let ca_der = certs(ca_cert_pem.as_bytes(), "CA certificate")?.swap_remove(0);
    let ca_key =
        KeyPair::from_pem(ca_key_pem).map_err(|source| TlsError::Generate { what: "CA private key", source })?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| TlsError::Pem { input: "CA certificate", reason: e.to_string() })?;
    if !ca.is_ca() {
        return Err(refuse("the CA certificate is not a CA (no basicConstraints cA)".into()));
    }
    if *ca.public_key().subject_public_key.data != *ca_key.public_key_raw() {
        return Err(refuse("the CA private key does not belong to the CA certificate".into()));
    }
    let ca_not_after = ca.validity().not_after.to_datetime();
    if params.not_after > ca_not_after {
        return Err(refuse(format!(
            "would be valid until {} but its CA only until {}: shorten the validity or make a new CA",
            params.not_after.date(),
            ca_not_after.date()
        )));
    }
    let issuer =
        Issuer::from_ca_cert_der(&ca_der, ca_key).map_err(|source| TlsError::Generate { what: "CA", source })?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let key = new_key()?;
    let cert = params.signed_by(&key, &issuer).map_err(|source| TlsError::Generate { what, source })?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// RFC 3986 percent-encoding of everything but the unreserved characters, so any edge id
/// makes a valid URI.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `s` cut to at most `max` bytes at a char boundary, with "…" if cut.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let end = (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::time::Duration;

    use proptest::prelude::*;
    use rustls::{CertificateError, ClientConnection, Connection, ServerConnection};

    /// Leaf validity; the CA's is longer, as a leaf may not outlive its CA.
    const DAYS: u32 = 30;
    const CA_DAYS: u32 = 365;
    const EDGE: &str = "edge-01";
    const HOST: &str = "core-1.example";
    /// A TLS 1.3 handshake takes two round trips; a few more cover the session tickets.
    const HANDSHAKE_ROUNDS_MAX: usize = 8;

    /// `(cert PEM, key PEM)`.
    type Pem = (String, String);

    struct Pki {
        ca: Pem,
        server: Pem,
        edge: Pem,
    }

    fn pki() -> Pki {
        let ca = generate_ca("Backhaul test CA", CA_DAYS).unwrap();
        let server = issue_server_cert(&ca.0, &ca.1, &[HOST.into(), "127.0.0.1".into()], DAYS).unwrap();
        let edge = issue_edge_cert(&ca.0, &ca.1, EDGE, DAYS).unwrap();
        Pki { ca, server, edge }
    }

    fn server(ca: &Pem, server: &Pem) -> ServerConfig {
        server_config(ca.0.as_bytes(), server.0.as_bytes(), server.1.as_bytes(), ALPN_ACCEPTED).unwrap()
    }

    fn client(ca: &Pem, edge: &Pem, alpn: &[&[u8]]) -> ClientConfig {
        client_config(ca.0.as_bytes(), edge.0.as_bytes(), edge.1.as_bytes(), alpn).unwrap()
    }

    /// Runs a handshake in memory; the first error either side meets.
    fn handshake(client: ClientConfig, server: ServerConfig, name: &str) -> Result<ServerConnection, rustls::Error> {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let mut c = Connection::from(ClientConnection::new(Arc::new(client), name)?);
        let mut s = Connection::from(ServerConnection::new(Arc::new(server))?);
        for _ in 0..HANDSHAKE_ROUNDS_MAX {
            transfer(&mut c, &mut s)?;
            transfer(&mut s, &mut c)?;
            if !c.is_handshaking() && !s.is_handshaking() {
                let Connection::Server(s) = s else { unreachable!("s was made a server") };
                return Ok(s);
            }
        }
        panic!("handshake did not finish in {HANDSHAKE_ROUNDS_MAX} rounds");
    }

    fn transfer(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets()?;
        }
        Ok(())
    }

    fn is_cert_error(e: &rustls::Error, f: impl Fn(&CertificateError) -> bool) -> bool {
        matches!(e, rustls::Error::InvalidCertificate(c) if f(c))
    }

    #[test]
    fn handshake_yields_the_edge_id() {
        let p = pki();
        let s = handshake(client(&p.ca, &p.edge, &[ALPN_V1]), server(&p.ca, &p.server), HOST).unwrap();
        assert_eq!(s.alpn_protocol(), Some(ALPN_V1));
        let certs = s.peer_certificates().expect("client certificate required");
        assert_eq!(peer_edge_id(&certs[0]).unwrap(), EDGE);
        // The server certificate's IP SAN works too.
        handshake(client(&p.ca, &p.edge, &[ALPN_V1]), server(&p.ca, &p.server), "127.0.0.1").unwrap();
    }

    #[test]
    fn client_cert_from_another_ca_is_refused() {
        let p = pki();
        let other = generate_ca("Other CA", CA_DAYS).unwrap();
        let edge = issue_edge_cert(&other.0, &other.1, EDGE, DAYS).unwrap();
        let e = handshake(client(&p.ca, &edge, &[ALPN_V1]), server(&p.ca, &p.server), HOST).unwrap_err();
        assert!(is_cert_error(&e, |c| *c == CertificateError::UnknownIssuer), "{e:?}");
    }

    #[test]
    fn client_without_cert_is_refused() {
        let p = pki();
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(root_store(p.ca.0.as_bytes()).unwrap())
            .with_no_client_auth();
        let e = handshake(client, server(&p.ca, &p.server), HOST).unwrap_err();
        assert!(matches!(e, rustls::Error::NoCertificatesPresented), "{e:?}");
    }

    #[test]
    fn expired_client_cert_is_refused() {
        let p = pki();
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let edge = issue_edge_cert_with_validity(&p.ca.0, &p.ca.1, EDGE, now - 10 * day, now - day).unwrap();
        let e = handshake(client(&p.ca, &edge, &[ALPN_V1]), server(&p.ca, &p.server), HOST).unwrap_err();
        let expired =
            |c: &CertificateError| matches!(c, CertificateError::Expired | CertificateError::ExpiredContext { .. });
        assert!(is_cert_error(&e, expired), "{e:?}");
    }

    #[test]
    fn server_cert_for_another_name_is_refused() {
        let p = pki();
        let e = handshake(client(&p.ca, &p.edge, &[ALPN_V1]), server(&p.ca, &p.server), "core-2.example").unwrap_err();
        let wrong_name = |c: &CertificateError| {
            matches!(c, CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })
        };
        assert!(is_cert_error(&e, wrong_name), "{e:?}");
    }

    #[test]
    fn roles_do_not_swap() {
        let p = pki();
        // A server certificate (serverAuth) presented by a client.
        let e = handshake(client(&p.ca, &p.server, &[ALPN_V1]), server(&p.ca, &p.server), HOST).unwrap_err();
        assert!(
            is_cert_error(&e, |c| matches!(
                c,
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            )),
            "{e:?}"
        );
        // An edge certificate (clientAuth) presented by a server.
        let e = handshake(client(&p.ca, &p.edge, &[ALPN_V1]), server(&p.ca, &p.edge), EDGE).unwrap_err();
        assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e:?}");
    }

    #[test]
    fn alpn_picks_a_shared_version_or_refuses() {
        let p = pki();
        let e = handshake(client(&p.ca, &p.edge, &[b"backhaul/0"]), server(&p.ca, &p.server), HOST).unwrap_err();
        assert!(matches!(e, rustls::Error::NoApplicationProtocol), "{e:?}");
        // A newer edge offering v2 first still reaches a v1 core.
        let s = handshake(client(&p.ca, &p.edge, &[b"backhaul/2", ALPN_V1]), server(&p.ca, &p.server), HOST).unwrap();
        assert_eq!(s.alpn_protocol(), Some(ALPN_V1));
        assert!(matches!(
            client_config(p.ca.0.as_bytes(), p.edge.0.as_bytes(), p.edge.1.as_bytes(), &[]),
            Err(TlsError::NoAlpn)
        ));
    }

    #[test]
    fn peer_edge_id_refuses_certs_without_one_valid_cn() {
        let p = pki();
        let key = KeyPair::generate().unwrap();
        let der_with = |dn: DistinguishedName| {
            let mut params = CertificateParams::default();
            params.distinguished_name = dn;
            params.self_signed(&key).unwrap().der().to_vec()
        };
        let no_cn = der_with(DistinguishedName::new());
        assert!(peer_edge_id(&no_cn).unwrap_err().to_string().contains("no CommonName"));
        let mut two = common_name_only("edge-a");
        // The CommonName OID under another key: rcgen keeps one entry per DnType.
        two.push(DnType::CustomDnType(vec![2, 5, 4, 3]), "edge-b");
        assert!(peer_edge_id(&der_with(two)).unwrap_err().to_string().contains("more than one"));
        let bell = der_with(common_name_only("edge\u{7}"));
        assert!(matches!(peer_edge_id(&bell), Err(TlsError::InvalidEdgeId { .. })));
        let long = der_with(common_name_only(&"e".repeat(PRODUCER_LEN_MAX + 1)));
        assert!(matches!(peer_edge_id(&long), Err(TlsError::InvalidEdgeId { .. })));
        assert!(matches!(peer_edge_id(b"not a certificate"), Err(TlsError::PeerCertificate { .. })));
        let edge = certs(p.edge.0.as_bytes(), "edge").unwrap();
        assert_eq!(peer_edge_id(&edge[0]).unwrap(), EDGE);
    }

    #[test]
    fn edge_cert_carries_the_uri_san() {
        let p = pki();
        let id = "site 7/ü";
        let edge = issue_edge_cert(&p.ca.0, &p.ca.1, id, DAYS).unwrap();
        let der = certs(edge.0.as_bytes(), "edge").unwrap().swap_remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let uri = format!("{EDGE_URI_PREFIX}site%207%2F%C3%BC");
        assert!(
            san.value
                .general_names
                .iter()
                .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == uri)),
            "{:?}",
            san.value.general_names
        );
        assert_eq!(peer_edge_id(&der).unwrap(), id);
    }

    #[test]
    fn issuing_checks_the_ca() {
        let p = pki();
        let other = generate_ca("Other CA", CA_DAYS).unwrap();
        let e = issue_edge_cert(&p.ca.0, &other.1, EDGE, DAYS).unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");
        let e = issue_edge_cert(&p.server.0, &p.server.1, EDGE, DAYS).unwrap_err();
        assert!(e.to_string().contains("not a CA"), "{e}");
        let e = issue_edge_cert(&p.ca.0, &p.ca.1, EDGE, CA_DAYS + 1).unwrap_err();
        assert!(e.to_string().contains("its CA only until"), "{e}");
        assert!(issue_edge_cert(&p.ca.0, &p.ca.1, "", DAYS).is_err());
        assert!(issue_edge_cert(&p.ca.0, &p.ca.1, EDGE, 0).is_err());
        assert!(generate_ca("CA", u32::MAX).is_err());
        assert!(issue_server_cert(&p.ca.0, &p.ca.1, &[], DAYS).is_err());
        let e = issue_server_cert(&p.ca.0, &p.ca.1, &["core 1".into()], DAYS).unwrap_err();
        assert!(e.to_string().contains("neither a DNS name"), "{e}");
    }

    #[test]
    fn bad_pem_is_named() {
        let p = pki();
        let e = server_config(p.ca.0.as_bytes(), p.server.0.as_bytes(), b"junk", ALPN_ACCEPTED).unwrap_err();
        assert!(e.to_string().starts_with("private key"), "{e}");
        let e = server_config(b"", p.server.0.as_bytes(), p.server.1.as_bytes(), ALPN_ACCEPTED).unwrap_err();
        assert!(e.to_string().starts_with("CA certificate"), "{e}");
        // A key that is not the certificate's.
        let e =
            server_config(p.ca.0.as_bytes(), p.server.0.as_bytes(), p.edge.1.as_bytes(), ALPN_ACCEPTED).unwrap_err();
        assert!(matches!(e, TlsError::Rustls { .. }), "{e}");
    }

    #[test]
    fn load_pem_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.pem");
        let e = load_pem_file(&path).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'a'; PEM_FILE_BYTES_MAX as usize + 1]).unwrap();
        assert!(matches!(load_pem_file(&big), Err(TlsError::FileTooLarge { .. })));
        std::fs::write(&big, b"pem").unwrap();
        assert_eq!(load_pem_file(&big).unwrap(), b"pem");
    }

    #[test]
    fn expiry_and_serial_are_read_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_key) = generate_ca("expiry CA", 30).unwrap();
        let (edge_a, key_a) = issue_edge_cert(&ca, &ca_key, "edge-1", 3).unwrap();
        let (edge_b, _) = issue_edge_cert(&ca, &ca_key, "edge-1", 10).unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let days = |t: i64| (t - now + 43_200) / 86_400;
        assert_eq!(days(pem_not_after(edge_a.as_bytes(), "certificate").unwrap()), 3);
        assert_eq!(days(pem_not_after(ca.as_bytes(), "CA certificate").unwrap()), 30);
        // A file of several certificates expires with the first of them.
        let both = format!("{edge_b}{edge_a}");
        assert_eq!(days(pem_not_after(both.as_bytes(), "certificate").unwrap()), 3);
        let (sa, sb) = (pem_serial(edge_a.as_bytes()).unwrap(), pem_serial(edge_b.as_bytes()).unwrap());
        assert_ne!(sa, sb, "each certificate has its own serial");
        assert!(sa.chars().all(|c| c.is_ascii_hexdigit()) && !sa.is_empty(), "{sa}");
        let write = |name: &str, pem: &str| {
            let p = dir.path().join(name);
            fs::write(&p, pem).unwrap();
            p
        };
        let files = CertFiles {
            ca_file: write("ca.pem", &ca),
            cert_file: write("edge.pem", &edge_a),
            key_file: write("edge.key", &key_a),
        };
        let (_, expiry) = files.client_config(&[ALPN_V1]).unwrap();
        assert_eq!((days(expiry.cert_not_after), days(expiry.ca_not_after)), (3, 30));
        // A key that does not match the certificate is refused as a whole.
        fs::write(&files.cert_file, &edge_b).unwrap();
        assert!(matches!(files.client_config(&[ALPN_V1]), Err(TlsError::Rustls { .. })));
        assert!(matches!(pem_not_after(b"junk", "certificate"), Err(TlsError::Pem { input: "certificate", .. })));
    }

    #[test]
    fn cut_keeps_char_boundaries() {
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut("aéb", 2), "a…");
    }

    proptest! {
        /// An edge id is exactly what the batch codec takes as a producer.
        #[test]
        fn edge_id_rule_matches_the_batch_codec(id in prop_oneof![any::<String>(), "\\PC{0,70}", "[a-z0-9-]{60,70}"]) {
            use crate::batch::{BatchMeta, GapReason, PayloadFormat, encode_gap};
            use crate::ids::{Epoch, Seq};
            let meta = BatchMeta {
                producer: id.clone(),
                epoch: Epoch(1),
                stream: "cdr".into(),
                base_seq: Seq(0),
                payload_format: PayloadFormat::Json,
            };
            let codec_ok = encode_gap(&meta, 1, GapReason::Corruption, (0, 0), &mut bytes::BytesMut::new()).is_ok();
            prop_assert_eq!(check_edge_id(&id).is_ok(), codec_ok);
        }
    }
}
