//! HTTP for the network tests: a one-file server on the host for containers to fetch from,
//! and a client for a container's published port, retried while it comes up.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A one-file HTTP server on the host (for containers to fetch from): answers every request
/// with `body`, on all addresses, until dropped.
#[derive(Debug)]
pub struct HttpServer {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HttpServer {
    /// Listens on 0.0.0.0 (an ephemeral port).
    pub fn start(body: &'static str) -> HttpServer {
        let listener = TcpListener::bind("0.0.0.0:0").expect("binding the HTTP server");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                        let mut buf = [0u8; 4096];
                        let _ = s.read(&mut buf);
                        let _ = write!(
                            s,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        HttpServer { port, stop }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `GET /` from `127.0.0.1:port`, retried for up to a minute while the server comes up
/// (connection refused or reset); the body, or the last error.
pub fn http_get_local(port: u16) -> Result<String, String> {
    http_get(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

/// `GET /` from `addr`, retried for up to a minute while the server comes up (connection
/// refused or reset); the reply, or the last error.
pub fn http_get(addr: std::net::SocketAddr) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(body) if !body.is_empty() => return Ok(body),
            Ok(_) if Instant::now() >= deadline => return Err("empty reply".into()),
            Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}
