//! How the agent trusts the controller it dials, decided once at start from the controller URL,
//! the join token and `--ca`:
//!
//! ```text
//!   URL        join token          trust
//!   https://   RY1<fp>::secret     the chain must contain the CA whose sha256 is <fp>; the leaf
//!                                  is then verified against that CA alone (webpki: signature,
//!                                  validity, server name)
//!   https://   secret (old token)  --ca FILE if given, else the system's roots
//!   http://    secret (old token)  none: plain gRPC (the URL says so)
//!   http://    RY1<fp>::secret     refused: the controller serves TLS, the URL would send the
//!                                  token in clear
//! ```
//!
//! Invariants: an `https://` URL is never downgraded: a failed handshake is an error, never a
//! retry in plain text, and no byte of the join token or credential is written before the
//! handshake (and so the verification) succeeded. Errors say what does not match and what to do.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use runyard_proto::{Fingerprint, JoinToken, JoinTokenError};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};

/// ALPN the controller's gRPC port speaks.
const ALPN_H2: &[u8] = b"h2";

/// What the agent was told about the controller, checked.
#[derive(Clone, Debug)]
pub struct Trust {
    /// The secret to present (the join token without its fingerprint).
    pub secret: String,
    /// `None`: plain gRPC (an `http://` URL with an unpinned token).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// For logs: `pinned CA <fp>`, `CA file <path>`, `system roots` or `plain`.
    pub describe: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{0}")]
    Token(#[from] JoinTokenError),
    #[error(
        "the controller URL `{url}` is not http:// or https://: give its gRPC address, e.g. https://controller.example:7901"
    )]
    Scheme { url: String },
    #[error(
        "the join token carries the controller's CA fingerprint (the controller serves TLS) but the controller URL `{url}` is plain http://: use https:// so the token is not sent in clear"
    )]
    PlainWithPin { url: String },
    #[error("cannot read the CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("no usable system root certificates ({0}): give the controller's CA with --ca FILE")]
    SystemRoots(String),
    #[error("the TLS client configuration is not usable: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The mismatch a pinned handshake reports; its text is the agent's error message.
#[derive(Debug, thiserror::Error)]
#[error(
    "the controller's CA does not match the join token: fingerprint {presented}, token expects {expected} (is the URL right? a new join token is in the controller's <data dir>/agent.token)"
)]
pub struct PinMismatch {
    pub presented: Fingerprint,
    pub expected: Fingerprint,
}

impl Trust {
    /// Decides how to dial `url` with `token` (see the module's table); reads `ca` if needed.
    pub fn new(url: &str, token: &str, ca: Option<&Path>) -> Result<Trust, TrustError> {
        let token: JoinToken = token.parse()?;
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        let https = match scheme.as_deref() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(TrustError::Scheme { url: url.into() }),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (verifier, describe): (Arc<dyn ServerCertVerifier>, String) = match (https, token.ca) {
            (false, Some(_)) => return Err(TrustError::PlainWithPin { url: url.into() }),
            (false, None) => {
                return Ok(Trust {
                    secret: token.secret,
                    tls: None,
                    describe: "plain".into(),
                });
            }
            (true, Some(fp)) => (
                Arc::new(PinnedCa::new(fp, provider.clone())),
                format!("pinned CA {fp}"),
            ),
            (true, None) => match ca {
                Some(path) => (
                    roots_verifier(read_ca_file(path)?, &provider)?,
                    format!("CA file {}", path.display()),
                ),
                None => (
                    roots_verifier(system_roots()?, &provider)?,
                    "system roots".into(),
                ),
            },
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Trust {
            secret: token.secret,
            tls: Some(Arc::new(config)),
            describe,
        })
    }
}

fn roots_verifier(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, TrustError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map(|v| v as Arc<dyn ServerCertVerifier>)
        .map_err(|e| TrustError::Rustls(rustls::Error::General(e.to_string())))
}

/// The certificates of a PEM file as trust anchors.
pub fn read_ca_file(path: &Path) -> Result<RootCertStore, TrustError> {
    let err = |reason: String| TrustError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| match e {
            rustls::pki_types::pem::Error::Io(io) => err(io.to_string()),
            other => err(format!("not PEM certificates: {other:?}")),
        })?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| err(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TrustError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "none found".into());
        return Err(TrustError::SystemRoots(why));
    }
    Ok(roots)
}

/// Trusts exactly the CA whose fingerprint the join token carries: it must be among the
/// certificates the server sends, and the leaf must verify against it alone.
#[derive(Debug)]
pub struct PinnedCa {
    expected: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl PinnedCa {
    pub fn new(expected: Fingerprint, provider: Arc<CryptoProvider>) -> PinnedCa {
        PinnedCa { expected, provider }
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(at) = intermediates
            .iter()
            .position(|c| Fingerprint::of(c) == self.expected)
        else {
            // What the server would have us trust: the top of the chain it sent.
            let top = intermediates.last().unwrap_or(end_entity);
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch {
                    presented: Fingerprint::of(top),
                    expected: self.expected,
                })),
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(intermediates[at].clone().into_owned())?;
        let rest: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != at)
            .map(|(_, c)| c.clone())
            .collect();
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &rest, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS failure said in the operator's terms: a pin mismatch as is; a server that answered
/// in something other than TLS as such (the join token was not sent).
pub fn explain_handshake_error(error: &std::io::Error) -> String {
    let rustls_error = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e)))) => {
            match e.downcast_ref::<PinMismatch>() {
                Some(mismatch) => mismatch.to_string(),
                None => format!("the controller's certificate is not trusted: {e}"),
            }
        }
        Some(rustls::Error::InvalidCertificate(e)) => format!(
            "the controller's certificate is not trusted ({e}): check the URL's host name, the join token, or --ca"
        ),
        Some(rustls::Error::InvalidMessage(_)) => format!(
            "the server did not answer in TLS ({error}); it may serve plain gRPC (--no-tls). Nothing secret was sent. Use the URL of a TLS controller, or http:// only for one that really runs with --no-tls"
        ),
        _ if error.kind() == std::io::ErrorKind::UnexpectedEof => format!(
            "the server closed the connection during the TLS handshake ({error}); it may serve plain gRPC (--no-tls). Nothing secret was sent"
        ),
        _ => format!("TLS handshake failed: {error}"),
    }
}

/// The server name to verify for `host` (brackets of an IPv6 URL host removed).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string()).map_err(|e| format!("`{host}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "ryj_secret";

    fn token(fp: Option<Fingerprint>) -> String {
        JoinToken::new(fp, SECRET).to_string()
    }

    #[test]
    fn the_url_and_token_decide_the_trust() {
        let fp = Fingerprint::of(b"ca");
        let t = Trust::new("https://c:7901", &token(Some(fp)), None).unwrap();
        assert_eq!(t.secret, SECRET, "the fingerprint is not sent as the token");
        assert!(t.tls.is_some());
        assert_eq!(t.describe, format!("pinned CA {fp}"));

        let t = Trust::new("http://c:7901", &token(None), None).unwrap();
        assert!(t.tls.is_none(), "plain only when the URL says http://");

        let e = Trust::new("http://c:7901", &token(Some(fp)), None).unwrap_err();
        assert!(matches!(e, TrustError::PlainWithPin { .. }), "{e}");
        assert!(e.to_string().contains("use https://"), "{e}");

        let e = Trust::new("c:7901", &token(None), None).unwrap_err();
        assert!(matches!(e, TrustError::Scheme { .. }), "{e}");

        let e = Trust::new("https://c", "RY1abc::x", None).unwrap_err();
        assert!(matches!(e, TrustError::Token(_)), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.crt");
        let e = Trust::new("https://c", &token(None), Some(&missing)).unwrap_err();
        assert!(matches!(e, TrustError::CaFile { .. }), "{e}");
        std::fs::write(&missing, "not pem").unwrap();
        let e = Trust::new("https://c", &token(None), Some(&missing)).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    /// A CA and a leaf for `names`, as DER.
    fn chain(names: &[&str]) -> (CertificateDer<'static>, CertificateDer<'static>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        (leaf.der().clone(), ca_cert.der().clone())
    }

    fn verify(
        pin: &PinnedCa,
        leaf: &CertificateDer<'_>,
        rest: &[CertificateDer<'_>],
        name: &str,
    ) -> Result<ServerCertVerified, rustls::Error> {
        pin.verify_server_cert(
            leaf,
            rest,
            &server_name(name).unwrap(),
            &[],
            UnixTime::now(),
        )
    }

    #[test]
    fn the_pinned_ca_alone_is_trusted_and_names_are_checked() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (leaf, ca) = chain(&["localhost", "127.0.0.1"]);
        let pin = PinnedCa::new(Fingerprint::of(&ca), provider.clone());
        verify(&pin, &leaf, std::slice::from_ref(&ca), "localhost").unwrap();
        verify(&pin, &leaf, std::slice::from_ref(&ca), "[127.0.0.1]").unwrap();

        // Right CA, wrong host: webpki's name check still applies.
        let e = verify(&pin, &leaf, std::slice::from_ref(&ca), "other.example").unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
                    | rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
            ),
            "{e:?}"
        );

        // Another CA (an impostor with a chain of its own): refused, naming both fingerprints.
        let (other_leaf, other_ca) = chain(&["localhost"]);
        let e = verify(
            &pin,
            &other_leaf,
            std::slice::from_ref(&other_ca),
            "localhost",
        )
        .unwrap_err();
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let text = explain_handshake_error(&io);
        assert_eq!(
            text,
            PinMismatch {
                presented: Fingerprint::of(&other_ca),
                expected: Fingerprint::of(&ca),
            }
            .to_string()
        );
        assert!(
            text.starts_with("the controller's CA does not match the join token: fingerprint ")
        );

        // The pinned CA sent alongside a leaf it did not sign: the signature check refuses it.
        let e = verify(&pin, &other_leaf, std::slice::from_ref(&ca), "localhost").unwrap_err();
        assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e:?}");

        // A leaf with no chain at all: nothing to pin.
        let e = verify(&pin, &leaf, &[], "localhost").unwrap_err();
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let text = explain_handshake_error(&io);
        assert!(text.contains("does not match the join token"), "{text}");
    }
}
