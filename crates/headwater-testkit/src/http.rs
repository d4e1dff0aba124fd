//! A plain HTTP/1.1 GET over a fresh loopback connection, without any HTTP client library: how
//! the tests read a producer's feed API independently of the client under test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long a request may take, in seconds (far more than anything on loopback takes).
const TIMEOUT_SECS: u64 = 60;

/// `GET path` on the server at `address` with the bearer `token` (`Connection: close`): the
/// status code and the body. Panics on a connection error or a response it cannot read (a
/// chunked one included: the feed API answers with a length).
pub fn get(address: SocketAddr, path: &str, token: &str) -> (u16, Vec<u8>) {
    let mut socket = TcpStream::connect(address).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(TIMEOUT_SECS)))
        .unwrap();
    write!(
        socket,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    socket.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response with a head");
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    assert!(
        !head.contains("transfer-encoding: chunked"),
        "a chunked response: {head}"
    );
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head:?}"));
    (code, response[split + 4..].to_vec())
}
