//! Test certificates (rcgen): CAs and the leaf certificates they sign, for `127.0.0.1` and
//! `localhost`, written as PEM files in a scratch directory for the daemon's and etcd's TLS
//! flags.

use std::path::PathBuf;

pub use rcgen::ExtendedKeyUsagePurpose;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// A scratch directory of PEM files.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// [`Pki::path`] as a flag's value.
    pub fn arg(&self, name: &str) -> String {
        self.path(name).to_str().expect("utf-8 path").to_owned()
    }

    /// A CA named `name`: writes `<name>.pem`; returns its issuer.
    pub fn ca(&self, name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("baton test {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key"))
            .expect("self-signed CA");
        std::fs::write(self.path(&format!("{name}.pem")), ca.pem()).expect("write CA");
        ca
    }

    /// A certificate for 127.0.0.1 and localhost signed by `ca`, for `purposes`: writes
    /// `<name>.pem` and `<name>-key.pem`.
    pub fn leaf(
        &self,
        name: &str,
        ca: &CertifiedIssuer<'static, KeyPair>,
        purposes: &[ExtendedKeyUsagePurpose],
    ) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = purposes.to_vec();
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, ca).expect("sign");
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write cert");
        std::fs::write(self.path(&format!("{name}-key.pem")), key.serialize_pem())
            .expect("write key");
    }

    /// The daemon's flags to serve TLS with certificate `name` (see [`Pki::leaf`]).
    pub fn tls_flags(&self, name: &str) -> [String; 4] {
        [
            "--tls-cert-file".to_owned(),
            self.arg(&format!("{name}.pem")),
            "--tls-key-file".to_owned(),
            self.arg(&format!("{name}-key.pem")),
        ]
    }
}
