//! Where the daemon serves gRPC: a TCP address (loopback by default: a sidecar serves its own
//! pod), optionally with TLS and mutual TLS, or a Unix socket that workers in other containers
//! reach through a shared volume. Everything is checked before anything is served (TLS files,
//! key and certificate, socket path, port); each error names the flag at fault, and `main`
//! exits with status 2.
//!
//! ```text
//!  --listen 127.0.0.1:50051                      plain TCP, loopback (the default)
//!  --listen 0.0.0.0:50051 --tls-cert-file C      TLS; with --tls-client-ca-file, mutual TLS
//!           --tls-key-file K
//!  --listen unix:/run/baton/baton.sock           a Unix socket (a stale socket file is replaced)
//! ```

use std::{
    fmt,
    io::ErrorKind as IoKind,
    net::SocketAddr,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::{TcpListener, UnixListener};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The longest path a Unix socket address can hold (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// A `--listen` value: a TCP address or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `HOST:PORT` with an IP address.
    Tcp(SocketAddr),
    /// `unix:PATH` (or `unix://PATH`).
    Unix(PathBuf),
}

/// Why a `--listen` value is not an address.
#[derive(Debug, thiserror::Error)]
pub enum ListenAddrError {
    /// Not `HOST:PORT` with an IP address.
    #[error("expected HOST:PORT with an IP address (e.g. 127.0.0.1:50051) or unix:PATH")]
    Tcp(#[source] std::net::AddrParseError),
    /// `unix:` with no path.
    #[error("unix: needs a path, e.g. unix:/run/baton/baton.sock")]
    EmptyPath,
    /// A path longer than a socket address can hold.
    #[error("the socket path is {len} bytes; a Unix socket path can be at most {MAX_SOCKET_PATH}")]
    LongPath {
        /// The path's length in bytes.
        len: usize,
    },
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let Some(rest) = value.strip_prefix("unix:") else {
            return value
                .parse()
                .map(ListenAddr::Tcp)
                .map_err(ListenAddrError::Tcp);
        };
        // `unix:///run/x.sock` (the URI form) and `unix:/run/x.sock` name the same path.
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if path.is_empty() {
            return Err(ListenAddrError::EmptyPath);
        }
        if path.len() > MAX_SOCKET_PATH {
            return Err(ListenAddrError::LongPath { len: path.len() });
        }
        Ok(ListenAddr::Unix(PathBuf::from(path)))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// How long a TLS client may take to complete its handshake.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The TLS files of a TCP listener (`--tls-cert-file`, `--tls-key-file`,
/// `--tls-client-ca-file`). Named here; read and checked by [`Listener::bind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain of the server, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of the certificate.
    pub key_file: PathBuf,
    /// PEM certificates of the CAs whose client certificates are accepted; with it, a client
    /// without a valid certificate is refused (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

/// Why the daemon cannot listen where it was told. Every message starts with the flag.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A TLS file cannot be read.
    #[error("{flag} {}: cannot read: {source}", path.display())]
    ReadTlsFile {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A TLS file holds no usable PEM item of the expected kind.
    #[error("{flag} {}: {what}: {source}", path.display())]
    ParseTlsFile {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
        /// Why it is unusable.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate and key do not make a TLS server identity (e.g. they do not match).
    #[error("--tls-key-file {}: not usable with --tls-cert-file {}: {source}",
        key.display(), cert.display())]
    TlsIdentity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls refused.
        #[source]
        source: rustls::Error,
    },
    /// The client CA file holds no certificate a client could be verified against.
    #[error("--tls-client-ca-file {}: {source}", path.display())]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// What rustls refused.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The TCP address cannot be bound (taken, not local, not permitted).
    #[error("--listen {addr}: cannot bind: {source}")]
    BindTcp {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something other than a socket is at the socket path; Baton does not remove it.
    #[error("--listen unix:{}: the path exists and is not a socket; not removing it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A live daemon already listens on the socket.
    #[error("--listen unix:{}: another process is listening on this socket", path.display())]
    SocketInUse {
        /// The path.
        path: PathBuf,
    },
    /// The socket path cannot be inspected, cleared or bound (a missing or read-only directory).
    #[error("--listen unix:{}: cannot {op}: {source}", path.display())]
    Unix {
        /// What failed: inspect, remove the stale socket, bind.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A bound listener, with its TLS configuration: what the daemon (`daemon::run`) serves on.
#[derive(Debug)]
pub struct Listener {
    pub(crate) socket: Socket,
    pub(crate) tls: Option<ServerTlsConfig>,
}

/// The bound socket.
#[derive(Debug)]
pub(crate) enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFile),
}

/// Removes the socket file when the daemon stops, so the next start finds the path free.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path)
            && error.kind() != IoKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), %error, "cannot remove the socket file");
        }
    }
}

impl From<TcpListener> for Listener {
    /// Plain TCP on an already bound listener (tests bind `127.0.0.1:0`).
    fn from(listener: TcpListener) -> Self {
        Listener {
            socket: Socket::Tcp(listener),
            tls: None,
        }
    }
}

impl Listener {
    /// Check the TLS files, then bind `addr`. A stale socket file (no process listens on it) is
    /// replaced; anything else at a socket path is left alone and reported.
    ///
    /// # Errors
    /// A TLS file is unreadable or unusable, or the address cannot be bound; the error names
    /// the flag.
    ///
    /// A Unix socket gets file mode `socket_mode` before any client can reach it: it is bound
    /// under a temporary name beside `addr`, given the mode, then renamed into place, so the
    /// umask never decides who may connect.
    pub async fn bind(
        addr: &ListenAddr,
        tls: Option<&TlsFiles>,
        socket_mode: u32,
    ) -> Result<Self, ListenError> {
        let tls = tls.map(load_tls).transpose()?;
        let socket = match addr {
            ListenAddr::Tcp(addr) => {
                Socket::Tcp(TcpListener::bind(addr).await.map_err(|source| {
                    ListenError::BindTcp {
                        addr: *addr,
                        source,
                    }
                })?)
            }
            ListenAddr::Unix(path) => {
                clear_stale_socket(path).await?;
                let listener = bind_private(path, socket_mode)?;
                Socket::Unix(listener, SocketFile { path: path.clone() })
            }
        };
        Ok(Listener { socket, tls })
    }

    /// The address actually bound (the kernel's port for `:0`), as `--listen` would name it.
    pub fn local_addr(&self) -> String {
        match &self.socket {
            Socket::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|e| format!("<unknown: {e}>"), |a| a.to_string()),
            Socket::Unix(_, file) => format!("unix:{}", file.path.display()),
        }
    }

    /// Whether the listener serves TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether clients outside this host (or pod) may reach it: a TCP address that is not
    /// loopback.
    pub fn is_remote(&self) -> bool {
        match &self.socket {
            Socket::Tcp(listener) => listener.local_addr().is_ok_and(|a| !a.ip().is_loopback()),
            Socket::Unix(..) => false,
        }
    }
}

/// Make `path` free for a new socket: nothing there, or a socket nobody listens on (left by a
/// daemon that was killed).
/// A Unix socket at `path` with file mode `mode`, whatever the umask. It is bound under a hidden
/// name, given its mode and linked into place before it listens, so no client can connect
/// before the mode is set; the link fails if `path` appeared meanwhile (another daemon won).
fn bind_private(path: &Path, mode: u32) -> Result<UnixListener, ListenError> {
    use socket2::{Domain, SockAddr, Type};
    use std::os::unix::fs::PermissionsExt as _;
    let unix = |op| {
        move |source| ListenError::Unix {
            op,
            path: path.to_owned(),
            source,
        }
    };
    let mut hidden = path.as_os_str().to_owned();
    hidden.push(format!(".{}.tmp", std::process::id()));
    let hidden = PathBuf::from(hidden);
    // A leftover of an earlier process that had this pid (a container's pid 1).
    let _ = std::fs::remove_file(&hidden);
    let socket = socket2::Socket::new(Domain::UNIX, Type::STREAM, None).map_err(unix("create"))?;
    socket
        .bind(&SockAddr::unix(&hidden).map_err(unix("bind"))?)
        .map_err(unix("bind"))?;
    let placed = std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(mode))
        .map_err(unix("set the mode of"))
        .and_then(|()| {
            std::fs::hard_link(&hidden, path).map_err(|e| match e.kind() {
                IoKind::AlreadyExists => ListenError::SocketInUse {
                    path: path.to_owned(),
                },
                _ => unix("link into place")(e),
            })
        });
    let _ = std::fs::remove_file(&hidden);
    placed?;
    let listening = socket
        .listen(1024)
        .and_then(|()| socket.set_nonblocking(true))
        .and_then(|()| {
            let std = std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(socket));
            UnixListener::from_std(std)
        });
    listening.map_err(|e| {
        let _ = std::fs::remove_file(path);
        unix("listen on")(e)
    })
}

async fn clear_stale_socket(path: &Path) -> Result<(), ListenError> {
    let unix = |op, source| ListenError::Unix {
        op,
        path: path.to_owned(),
        source,
    };
    let metadata = match tokio::fs::symlink_metadata(path).await {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == IoKind::NotFound => return Ok(()),
        Err(e) => return Err(unix("inspect the path", e)),
    };
    if !metadata.file_type().is_socket() {
        return Err(ListenError::NotASocket {
            path: path.to_owned(),
        });
    }
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => Err(ListenError::SocketInUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == IoKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing a stale socket file");
            tokio::fs::remove_file(path)
                .await
                .map_err(|e| unix("remove the stale socket", e))
        }
        Err(e) => Err(unix("inspect the socket", e)),
    }
}

/// Read the TLS files and check that they make a server configuration, naming the bad flag.
/// rustls checks the same things when tonic builds its acceptor, but would not say which file.
///
/// # Errors
/// A file is unreadable, holds no PEM item of its kind, or the key does not fit the
/// certificate.
pub fn load_tls(files: &TlsFiles) -> Result<ServerTlsConfig, ListenError> {
    let read = |flag, path: &Path| {
        std::fs::read(path).map_err(|source| ListenError::ReadTlsFile {
            flag,
            path: path.to_owned(),
            source,
        })
    };
    let parse_error = |flag, path: &Path, what| {
        let path = path.to_owned();
        move |source| ListenError::ParseTlsFile {
            flag,
            path,
            what,
            source,
        }
    };
    let cert_pem = read("--tls-cert-file", &files.cert_file)?;
    let key_pem = read("--tls-key-file", &files.key_file)?;
    let chain = certificates(&cert_pem).map_err(parse_error(
        "--tls-cert-file",
        &files.cert_file,
        "expected PEM certificates",
    ))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(parse_error(
        "--tls-key-file",
        &files.key_file,
        "expected a PEM private key",
    ))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let identity_error = |source| ListenError::TlsIdentity {
        cert: files.cert_file.clone(),
        key: files.key_file.clone(),
        source,
    };
    rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(identity_error)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(identity_error)?;
    // A client that connects but does not finish the handshake is dropped, its place freed.
    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        .timeout(TLS_HANDSHAKE_TIMEOUT);
    if let Some(ca_file) = &files.client_ca_file {
        let ca_pem = read("--tls-client-ca-file", ca_file)?;
        let cas = certificates(&ca_pem).map_err(parse_error(
            "--tls-client-ca-file",
            ca_file,
            "expected PEM CA certificates",
        ))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(cas);
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .map_err(|source| ListenError::ClientCa {
                path: ca_file.clone(),
                source,
            })?;
        config = config.client_ca_root(Certificate::from_pem(ca_pem));
    }
    // tonic builds its acceptor with rustls' process-wide provider: make it ring (the one
    // compiled in). An error means one is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(config)
}

/// Every certificate of a PEM file; at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    let chain = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>()?;
    if chain.is_empty() {
        return Err(rustls::pki_types::pem::Error::NoItemsFound);
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_never_replaces_one_bound_meanwhile() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.sock");
        let _first = bind_private(&path, 0o600).expect("the first binds");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let second = bind_private(&path, 0o600).map(|_| ()).unwrap_err();
        assert!(
            matches!(second, ListenError::SocketInUse { .. }),
            "{second}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no hidden name left behind");
        tokio::net::UnixStream::connect(&path)
            .await
            .expect("the first still serves");
    }

    #[test]
    fn addresses() {
        assert_eq!(
            "127.0.0.1:50051".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:50051".parse().unwrap())
        );
        for unix in ["unix:/run/b.sock", "unix:///run/b.sock"] {
            assert_eq!(
                unix.parse::<ListenAddr>().unwrap(),
                ListenAddr::Unix("/run/b.sock".into()),
                "{unix}"
            );
        }
        assert_eq!(
            "unix:rel.sock".parse::<ListenAddr>().unwrap().to_string(),
            "unix:rel.sock"
        );
        for bad in ["localhost:1", "unix:", "unix://", "1.2.3.4"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
        let long = format!("unix:/{}", "x".repeat(MAX_SOCKET_PATH));
        assert!(matches!(
            long.parse::<ListenAddr>(),
            Err(ListenAddrError::LongPath { .. })
        ));
    }
}
