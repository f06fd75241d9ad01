//! Ports for servers that must be told theirs before they start (etcd's client and peer URLs,
//! the tansu broker): they cannot bind port 0 and report what they got. A port that was free a
//! moment ago can be taken by another process before the server binds it, so [`on_fresh_ports`]
//! starts the server again on fresh ports when it lost that race, a bounded number of times,
//! and says so on stderr. Baton itself binds `127.0.0.1:0` or a Unix socket and reports its
//! address (`baton serving listen=...`): the harness never picks a port for it.

use std::net::TcpListener;

/// How many times a server is started on fresh ports before the test fails.
pub const ATTEMPTS: usize = 5;

/// The server lost a chosen port to another process ("address already in use"); the text says
/// what showed it.
#[derive(Debug)]
pub struct PortTaken(pub String);

/// `n` distinct loopback ports the kernel handed out for port 0 a moment ago (all bound at
/// once, so they differ, then released for the server to bind).
fn unbound_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// Run `start` with `n` fresh loopback ports; when it reports [`PortTaken`], log it and run it
/// again on new ports, at most [`ATTEMPTS`] times.
pub fn on_fresh_ports<T>(
    what: &str,
    n: usize,
    mut start: impl FnMut(&[u16]) -> Result<T, PortTaken>,
) -> T {
    for attempt in 1..=ATTEMPTS {
        let ports = unbound_ports(n);
        match start(&ports) {
            Ok(started) => return started,
            Err(PortTaken(why)) => eprintln!(
                "{what}: ports {ports:?} were taken before it bound them ({why}); \
                 attempt {attempt} of {ATTEMPTS}"
            ),
        }
    }
    panic!("{what}: lost its ports to other processes {ATTEMPTS} times in a row");
}

/// Whether process `pid` holds a listening TCP socket on `port` (from `/proc/net/tcp{,6}` and
/// the process's open files): a connection to the port reaches that process, not a squatter.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let port_hex = format!(":{port:04X}");
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, state (0A: LISTEN), inode.
            if fields.len() > 9 && fields[1].ends_with(&port_hex) && fields[3] == "0A" {
                inodes.push(format!("socket:[{}]", fields[9]));
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
}

/// A loopback address nobody listens on, kept so: a socket bound to it that never listens, so
/// that a connection is refused and no other process can take the port while the socket lives.
pub fn refusing_port() -> (socket2::Socket, std::net::SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind 127.0.0.1:0");
    let addr = socket
        .local_addr()
        .expect("local addr")
        .as_socket()
        .expect("an IP address");
    (socket, addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_that_lost_its_port_runs_again_on_fresh_ones() {
        let mut seen = Vec::new();
        let started = on_fresh_ports("test server", 2, |ports| {
            seen.push(ports.to_vec());
            if seen.len() < 3 {
                Err(PortTaken("address already in use".into()))
            } else {
                Ok(ports.to_vec())
            }
        });
        assert_eq!(seen.len(), 3);
        assert_eq!(started, seen[2]);
        assert!(
            seen.iter().all(|p| p.len() == 2 && p[0] != p[1]),
            "{seen:?}"
        );
    }

    #[test]
    fn listens_on_names_the_process_that_holds_the_port() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listens_on(std::process::id(), port));
        // PID 1 does not hold this test's port.
        assert!(!listens_on(1, port));
        drop(listener);
        assert!(!listens_on(std::process::id(), port));
    }

    #[test]
    fn a_refusing_port_refuses_and_stays_held() {
        let (_held, addr) = refusing_port();
        let refused = std::net::TcpStream::connect(addr).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        let taken = TcpListener::bind(addr).unwrap_err();
        assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
    }
}
