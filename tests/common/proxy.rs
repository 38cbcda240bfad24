//! A loopback TCP proxy that can cut every connection through it, to take
//! the database away from running daemons.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Forwards 127.0.0.1:`port` to a target address.
pub struct Proxy {
    port: u16,
    state: Arc<State>,
}

struct State {
    target: SocketAddr,
    /// While set, new connections are closed at once.
    refusing: AtomicBool,
    /// Both ends of every open connection, to shut down on a cut.
    open: Mutex<Vec<TcpStream>>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(State { target, refusing: AtomicBool::new(false), open: Mutex::new(Vec::new()) });
        let accepting = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                accepting.forward(client);
            }
        });
        Self { port, state }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Drops every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.state.refusing.store(true, Ordering::SeqCst);
        for stream in self.state.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.state.refusing.store(false, Ordering::SeqCst);
    }
}

impl State {
    fn forward(&self, client: TcpStream) {
        if self.refusing.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        let Ok(server) = TcpStream::connect(self.target) else {
            let _ = client.shutdown(Shutdown::Both);
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        {
            let mut open = self.open.lock().unwrap();
            open.push(client.try_clone().expect("clone client stream"));
            open.push(server.try_clone().expect("clone server stream"));
        }
        pump(client.try_clone().expect("clone"), server.try_clone().expect("clone"));
        pump(server, client);
    }
}

/// Copies `from` into `to` on a thread until either side closes.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    if to.write_all(&buffer[..read]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}
