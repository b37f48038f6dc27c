//! The controller's TLS identity: a CA and a server certificate it makes and keeps in its data
//! dir, or an operator's certificate; and the rustls server configurations built from either.
//!
//! Files (managed mode), under `<data dir>/tls/` (mode 0700):
//!
//! ```text
//!   ca.crt      the CA certificate (10 years). Its sha256 is the fingerprint in the join token.
//!   ca.key      its key (0600). Made once; never replaced while it exists.
//!   server.crt  the chain the server sends: its certificate (1 year), then ca.crt.
//!   server.key  its key (0600).
//! ```
//!
//! Invariants: the CA is created once and reused, so the fingerprint agents pin survives
//! restarts; the server certificate is re-issued (by the same CA) when it is missing, not
//! issued by the current CA, names other hosts than wanted, or has less than `RENEW_BEFORE`
//! left, at start and by the renewal task of a running controller; it always names `localhost`,
//! `127.0.0.1` and `::1` besides the advertised names. Key files are written with mode 0600
//! through a temp file and a rename, so a crash never leaves half a key.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use runyard_proto::Fingerprint;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

/// Subdirectory of the data dir holding the managed CA and server certificate.
pub const TLS_DIR: &str = "tls";
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const SERVER_CERT_FILE: &str = "server.crt";
pub const SERVER_KEY_FILE: &str = "server.key";
/// Names every managed server certificate carries, whatever is advertised.
pub const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// Lifetime of the managed CA.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// Lifetime of a managed server certificate.
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 86400);
/// A managed server certificate with less than this left is re-issued.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86400);
/// How often a running controller checks whether its managed certificate is due.
pub const RENEW_CHECK_PERIOD: Duration = Duration::from_secs(12 * 3600);
/// ALPN of the gRPC listener.
pub const ALPN_GRPC: &[u8] = b"h2";
/// ALPN of the HTTP listener (axum serves HTTP/1.1).
pub const ALPN_HTTP: &[u8] = b"http/1.1";

/// How the controller serves its two ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TlsSetup {
    /// Plain HTTP and gRPC (`--no-tls`, `runyard up` on loopback; the library default).
    #[default]
    Plain,
    /// A CA and a server certificate made and kept in the data dir; the server certificate
    /// names these hosts (DNS names or IP addresses) besides the loopback names.
    Managed { advertise: Vec<String> },
    /// The operator's certificate chain (PEM: leaf first, then its issuers) and key.
    Provided { cert: PathBuf, key: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error(
        "{cert} and {key} do not belong together ({reason}): give the key of the chain's first certificate"
    )]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("--advertise `{name}` is neither an IP address nor a DNS name")]
    Name { name: String },
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the TLS configuration is not usable: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider used on both sides (ring: no C toolchain beyond `cc`).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The serving identity: what the server presents, and what the join token pins.
pub struct ServerTls {
    /// sha256 of the CA certificate agents should pin: the managed CA, or the last certificate
    /// of an operator's chain when it has more than the leaf; `None` when there is none to pin.
    pub fingerprint: Option<Fingerprint>,
    /// The CA certificate clients can be given (`--ca`): `tls/ca.crt` in managed mode.
    pub ca_file: Option<PathBuf>,
    /// Names in the managed server certificate (empty for an operator's certificate).
    pub names: Vec<String>,
    current: Arc<Current>,
    data_dir: PathBuf,
    setup: TlsSetup,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("fingerprint", &self.fingerprint)
            .field("ca_file", &self.ca_file)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// The certificate handed to every handshake; swapped in place by a renewal.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

impl ServerTls {
    /// A server configuration presenting this identity, offering `alpn`.
    pub fn server_config(&self, alpn: &[u8]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.current.clone());
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }

    /// Re-issues the managed server certificate if it is due (see the module invariants) and
    /// serves the new one from the next handshake on. Returns whether it changed.
    pub fn renew_if_due(&self) -> Result<bool, TlsError> {
        let TlsSetup::Managed { advertise } = &self.setup else {
            return Ok(false);
        };
        let dir = self.data_dir.join(TLS_DIR);
        let (ca_der, ca_key) = ensure_ca(&dir)?;
        let names = wanted_names(advertise)?;
        if !issue_if_due(&dir, &ca_der, &ca_key, &names)? {
            return Ok(false);
        }
        let key = load_certified(&dir.join(SERVER_CERT_FILE), &dir.join(SERVER_KEY_FILE))?;
        *self.current.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(true)
    }
}

/// Loads (creating what is missing) the identity `setup` asks for; `None` for plain.
pub fn prepare(data_dir: &Path, setup: &TlsSetup) -> Result<Option<ServerTls>, TlsError> {
    let (fingerprint, ca_file, names, key) = match setup {
        TlsSetup::Plain => return Ok(None),
        TlsSetup::Managed { advertise } => {
            let dir = data_dir.join(TLS_DIR);
            create_private_dir(&dir)?;
            let (ca_der, ca_key) = ensure_ca(&dir)?;
            let names = wanted_names(advertise)?;
            issue_if_due(&dir, &ca_der, &ca_key, &names)?;
            let key = load_certified(&dir.join(SERVER_CERT_FILE), &dir.join(SERVER_KEY_FILE))?;
            let names = names.into_iter().collect();
            (
                Some(Fingerprint::of(&ca_der)),
                Some(dir.join(CA_CERT_FILE)),
                names,
                key,
            )
        }
        TlsSetup::Provided { cert, key } => {
            let certified = load_certified(cert, key)?;
            let fingerprint = match certified.cert.as_slice() {
                [_leaf, .., top] => Some(Fingerprint::of(top)),
                _ => {
                    warn!(
                        cert = %cert.display(),
                        "the certificate file holds no issuer certificate, so the join token pins no CA: agents need --ca or a system-trusted issuer"
                    );
                    None
                }
            };
            (fingerprint, None, Vec::new(), certified)
        }
    };
    Ok(Some(ServerTls {
        fingerprint,
        ca_file,
        names,
        current: Arc::new(Current(RwLock::new(Arc::new(key)))),
        data_dir: data_dir.to_path_buf(),
        setup: setup.clone(),
    }))
}

/// The host name and the addresses of this host's interfaces (loopback and IPv6 link-local
/// left out: the loopback names are always added, link-local ones need a zone).
pub fn default_names() -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(host) = fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_string());
        }
    }
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(addr) = a.address else { continue };
            let ip = if let Some(v4) = addr.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
            if !ip.is_loopback() && !ip.is_unspecified() && !link_local {
                names.push(ip.to_string());
            }
        }
    }
    names
}

/// The advertised names plus the loopback names, checked and normalised (IPs in canonical
/// form, DNS names in lower case), sorted and without duplicates.
fn wanted_names(advertise: &[String]) -> Result<BTreeSet<String>, TlsError> {
    let mut names = BTreeSet::new();
    for raw in advertise.iter().map(String::as_str).chain(LOOPBACK_NAMES) {
        let name = raw.trim().trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = name.parse::<IpAddr>() {
            names.insert(ip.to_string());
            continue;
        }
        let dns = name.to_ascii_lowercase();
        if rustls::pki_types::DnsName::try_from(dns.as_str()).is_err() {
            return Err(TlsError::Name {
                name: raw.to_string(),
            });
        }
        names.insert(dns);
    }
    Ok(names)
}

/// The CA certificate (DER) and key, created the first time.
fn ensure_ca(dir: &Path) -> Result<(Vec<u8>, KeyPair), TlsError> {
    let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
    if cert_path.exists() || key_path.exists() {
        let der = read_one_cert(&cert_path)?;
        let key = read_key_pair(&key_path)?;
        tighten(&key_path)?;
        return Ok((der, key));
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Runyard");
    params
        .distinguished_name
        .push(DnType::CommonName, "Runyard controller CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + CA_VALIDITY;
    let cert = params.self_signed(&key)?;
    // Key first: a crash between the two leaves a key without a certificate, which the next
    // start reports instead of silently making a second CA.
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    info!(ca = %cert_path.display(), fingerprint = %Fingerprint::of(cert.der()), "created the controller's CA");
    Ok((cert.der().to_vec(), key))
}

/// Issues a server certificate for `names` unless the one on disk is still good (see the
/// module invariants). Returns whether it issued one.
fn issue_if_due(
    dir: &Path,
    ca_der: &[u8],
    ca_key: &KeyPair,
    names: &BTreeSet<String>,
) -> Result<bool, TlsError> {
    let (cert_path, key_path) = (dir.join(SERVER_CERT_FILE), dir.join(SERVER_KEY_FILE));
    let reason = match reissue_reason(&cert_path, &key_path, ca_der, names) {
        None => return Ok(false),
        Some(r) => r,
    };
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca_der), ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.iter().cloned().collect::<Vec<_>>())?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "Runyard controller");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + SERVER_VALIDITY;
    let cert = params.signed_by(&key, &issuer)?;
    let ca_pem = fs::read_to_string(dir.join(CA_CERT_FILE)).map_err(|source| TlsError::Io {
        what: "read",
        path: dir.join(CA_CERT_FILE),
        source,
    })?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_file(
        &cert_path,
        format!("{}{}\n", cert.pem(), ca_pem.trim_end()).as_bytes(),
        0o644,
    )?;
    info!(cert = %cert_path.display(), names = ?names, reason, "issued the controller's server certificate");
    Ok(true)
}

/// Why the server certificate on disk must be re-issued; `None` if it is good.
fn reissue_reason(
    cert_path: &Path,
    key_path: &Path,
    ca_der: &[u8],
    names: &BTreeSet<String>,
) -> Option<&'static str> {
    let Ok(chain) = read_certs(cert_path) else {
        return Some("none yet");
    };
    if !key_path.exists() {
        return Some("its key is missing");
    }
    if chain.get(1).map(|c| c.as_ref()) != Some(ca_der) {
        return Some("not issued by the current CA");
    }
    let Ok((_, leaf)) = x509_parser::parse_x509_certificate(&chain[0]) else {
        return Some("unreadable");
    };
    let left =
        leaf.validity().not_after.timestamp() - time::OffsetDateTime::now_utc().unix_timestamp();
    if left < RENEW_BEFORE.as_secs() as i64 {
        return Some("expires soon");
    }
    let mut present = BTreeSet::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    present.insert(d.to_ascii_lowercase());
                }
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).map(IpAddr::from).ok(),
                        16 => <[u8; 16]>::try_from(*b).map(IpAddr::from).ok(),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        present.insert(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    (present != *names).then_some("the advertised names changed")
}

/// A chain (leaf first) and its key, checked to belong together.
fn load_certified(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs(cert)?;
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, "a private key", e))?;
    let certified =
        CertifiedKey::from_der(chain, der, &provider()).map_err(|e| TlsError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(certified)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(path, "certificates", e))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            reason: "no PEM certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn read_one_cert(path: &Path) -> Result<Vec<u8>, TlsError> {
    Ok(read_certs(path)?.swap_remove(0).to_vec())
}

fn read_key_pair(path: &Path) -> Result<KeyPair, TlsError> {
    let pem = fs::read_to_string(path).map_err(|source| TlsError::Io {
        what: "read",
        path: path.to_path_buf(),
        source,
    })?;
    KeyPair::from_pem(&pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        reason: format!("not a usable private key: {e}"),
    })
}

fn pem_error(path: &Path, what: &str, e: rustls::pki_types::pem::Error) -> TlsError {
    let reason = match e {
        rustls::pki_types::pem::Error::Io(io) => format!("cannot read it: {io}"),
        rustls::pki_types::pem::Error::NoItemsFound => format!("no PEM {what} in the file"),
        other => format!("not valid PEM {what}: {other:?}"),
    };
    TlsError::Pem {
        path: path.to_path_buf(),
        reason,
    }
}

fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let err = |source| TlsError::Io {
        what: "create",
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(err)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)
}

fn tighten(path: &Path) -> Result<(), TlsError> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| TlsError::Io {
        what: "set the mode of",
        path: path.to_path_buf(),
        source,
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    write_file(path, bytes, 0o600)
}

/// Writes through a temp file, fsync and rename.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Io {
        what: "write",
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn managed(names: &[&str]) -> TlsSetup {
        TlsSetup::Managed {
            advertise: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_ca_is_made_once_and_the_server_certificate_follows_the_names() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join(TLS_DIR);
        let first = prepare(dir.path(), &managed(&["ctl.example", "10.0.0.5"]))
            .unwrap()
            .unwrap();
        let fp = first.fingerprint.expect("a managed CA is pinned");
        assert_eq!(
            fp,
            Fingerprint::of(&read_one_cert(&tls.join(CA_CERT_FILE)).unwrap())
        );
        assert_eq!(
            first.names,
            ["10.0.0.5", "127.0.0.1", "::1", "ctl.example", "localhost"],
            "the loopback names are always there"
        );
        assert_eq!(mode(&tls), 0o700);
        assert_eq!(mode(&tls.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&tls.join(SERVER_KEY_FILE)), 0o600);
        // The server sends its certificate and the CA.
        let chain = read_certs(&tls.join(SERVER_CERT_FILE)).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(Fingerprint::of(&chain[1]), fp);

        // A restart with the same names changes nothing.
        let leaf = fs::read(tls.join(SERVER_CERT_FILE)).unwrap();
        let again = prepare(dir.path(), &managed(&["CTL.example", "10.0.0.5"]))
            .unwrap()
            .unwrap();
        assert_eq!(again.fingerprint, Some(fp));
        assert_eq!(fs::read(tls.join(SERVER_CERT_FILE)).unwrap(), leaf);

        // New names: a new server certificate from the same CA.
        let moved = prepare(dir.path(), &managed(&["ctl2.example"]))
            .unwrap()
            .unwrap();
        assert_eq!(moved.fingerprint, Some(fp), "agents' pins stay valid");
        assert_ne!(fs::read(tls.join(SERVER_CERT_FILE)).unwrap(), leaf);
        assert!(moved.names.contains(&"ctl2.example".to_string()));
        assert!(!moved.names.contains(&"ctl.example".to_string()));
        assert!(
            !moved.renew_if_due().unwrap(),
            "nothing due right after issue"
        );

        // A loosened key file is tightened on start.
        fs::set_permissions(tls.join(CA_KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        prepare(dir.path(), &managed(&["ctl2.example"])).unwrap();
        assert_eq!(mode(&tls.join(CA_KEY_FILE)), 0o600);
    }

    #[test]
    fn a_certificate_of_another_ca_is_reissued() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join(TLS_DIR);
        prepare(dir.path(), &managed(&[])).unwrap();
        // The CA replaced by hand (both files): the old server certificate no longer chains.
        fs::remove_file(tls.join(CA_CERT_FILE)).unwrap();
        fs::remove_file(tls.join(CA_KEY_FILE)).unwrap();
        let new = prepare(dir.path(), &managed(&[])).unwrap().unwrap();
        let chain = read_certs(&tls.join(SERVER_CERT_FILE)).unwrap();
        assert_eq!(Some(Fingerprint::of(&chain[1])), new.fingerprint);
    }

    #[test]
    fn bad_names_and_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let e = prepare(dir.path(), &managed(&["not a name"])).unwrap_err();
        assert!(matches!(e, TlsError::Name { .. }), "{e}");

        // A CA certificate without its key: reported, never silently replaced.
        prepare(dir.path(), &managed(&[])).unwrap();
        fs::remove_file(dir.path().join(TLS_DIR).join(CA_KEY_FILE)).unwrap();
        let e = prepare(dir.path(), &managed(&[])).unwrap_err().to_string();
        assert!(e.contains(CA_KEY_FILE), "{e}");

        let missing = TlsSetup::Provided {
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope.key"),
        };
        let e = prepare(dir.path(), &missing).unwrap_err().to_string();
        assert!(e.contains("nope.pem") && e.contains("cannot read"), "{e}");
        assert!(prepare(dir.path(), &TlsSetup::Plain).unwrap().is_none());
    }

    #[test]
    fn an_operator_chain_pins_its_last_certificate() {
        let dir = tempfile::tempdir().unwrap();
        // Use a managed identity's files as the operator's.
        let managed = prepare(dir.path(), &managed(&[])).unwrap().unwrap();
        let tls = dir.path().join(TLS_DIR);
        let provided = TlsSetup::Provided {
            cert: tls.join(SERVER_CERT_FILE),
            key: tls.join(SERVER_KEY_FILE),
        };
        let op = prepare(dir.path(), &provided).unwrap().unwrap();
        assert_eq!(op.fingerprint, managed.fingerprint);
        assert_eq!(op.ca_file, None);

        // The leaf alone: nothing to pin.
        let leaf_only = dir.path().join("leaf.pem");
        let text = fs::read_to_string(tls.join(SERVER_CERT_FILE)).unwrap();
        let end = "-----END CERTIFICATE-----";
        fs::write(&leaf_only, &text[..text.find(end).unwrap() + end.len()]).unwrap();
        let provided = TlsSetup::Provided {
            cert: leaf_only,
            key: tls.join(SERVER_KEY_FILE),
        };
        assert_eq!(
            prepare(dir.path(), &provided).unwrap().unwrap().fingerprint,
            None
        );

        // The CA's key with the server's certificate: refused.
        let wrong = TlsSetup::Provided {
            cert: tls.join(SERVER_CERT_FILE),
            key: tls.join(CA_KEY_FILE),
        };
        let e = prepare(dir.path(), &wrong).unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
    }
}
