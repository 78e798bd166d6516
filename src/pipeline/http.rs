//! `[http]`: `/metrics` (Prometheus text) and `/health` over plain HTTP/1.x on a small tokio
//! runtime of its own thread. Reads [`Metrics`]; never touches frames or the engine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::pipeline::metrics::Metrics;

/// A request head larger than this is refused (we serve two fixed paths).
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A client that has not sent its request head by then is disconnected.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "http.bind = `{bind}`: cannot listen there ({source}); pick another port or stop what uses it"
    )]
    Bind {
        bind: String,
        source: std::io::Error,
    },
    #[error("cannot start the HTTP thread: {0}")]
    Start(std::io::Error),
}

/// The running endpoint; [`HttpServer::stop`] ends it.
pub struct HttpServer {
    address: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `bind` (`ip:port`) at once, so a taken port fails the start, then serves on a thread.
    pub fn start(bind: &str, metrics: Arc<Metrics>) -> Result<Self, HttpError> {
        let bind_error = |source| HttpError::Bind {
            bind: bind.to_string(),
            source,
        };
        let listener = std::net::TcpListener::bind(bind).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let address = listener.local_addr().map_err(bind_error)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(HttpError::Start)?;
        let (shutdown, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || runtime.block_on(serve(listener, metrics, stopped)))
            .map_err(HttpError::Start)?;
        Ok(Self {
            address,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Where it listens (the real port when the configuration said 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops accepting and ends the thread (requests in progress are cut).
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

async fn serve(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    mut stopped: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            log::warn!("http: cannot serve: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, Arc::clone(&metrics)));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    log::warn!("http: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
}

async fn answer(mut stream: tokio::net::TcpStream, metrics: Arc<Metrics>) {
    let Ok(Some(head)) = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await else {
        return;
    };
    let response = route(&head, &metrics);
    let _ = stream.write_all(&response.to_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The request head (up to the blank line), or `None` when the client sent no complete head.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 || head.len() + read > MAX_REQUEST_HEAD {
            // A request line without the blank line (netcat) still gets an answer.
            return (!head.is_empty() && head.len() <= MAX_REQUEST_HEAD)
                .then(|| String::from_utf8_lossy(&head).into_owned());
        }
        head.extend_from_slice(&chunk[..read]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// An HTTP response with a fixed body.
#[derive(Debug, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// HEAD: headers only.
    pub head_only: bool,
}

impl Response {
    fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
            head_only: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            503 => "Service Unavailable",
            _ => "",
        };
        let mut bytes = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// Answers one request head: `GET`/`HEAD` of `/metrics` or `/health`.
pub fn route(head: &str, metrics: &Metrics) -> Response {
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return Response::text(400, "bad request\n");
    };
    let path = target.split('?').next().unwrap_or_default();
    let mut response = match path {
        "/metrics" => Response {
            status: 200,
            content_type: super::metrics::CONTENT_TYPE,
            body: metrics.render(),
            head_only: false,
        },
        "/health" => {
            // {"cameras":[{"camera":…,"state":…}],"status":"ok"|"unhealthy"}
            let (healthy, json) = metrics.health();
            Response {
                status: if healthy { 200 } else { 503 },
                content_type: "application/json",
                body: format!("{json}\n"),
                head_only: false,
            }
        }
        _ => return Response::text(404, "not found: try /metrics or /health\n"),
    };
    match method {
        "GET" => response,
        "HEAD" => {
            response.head_only = true;
            response
        }
        _ => Response::text(405, "use GET\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::metrics::CameraState;

    #[test]
    fn routes_metrics_health_and_errors() {
        let metrics = Metrics::new("cpu", "fp32", &["line1".into()]);
        let get = |head: &str| route(head, &metrics);
        let response = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(response.status, 200);
        assert!(
            response
                .body
                .contains("stpm_engine_info{provider=\"cpu\",precision=\"fp32\"} 1")
        );
        let response = get("GET /health HTTP/1.0\r\n\r\n");
        assert_eq!(response.status, 503);
        assert!(response.body.contains("\"starting\""), "{}", response.body);
        if let Some(camera) = metrics.camera("line1") {
            camera.set_state(CameraState::Online);
        }
        let response = get("GET /health?verbose=1 HTTP/1.0\r\n\r\n");
        assert_eq!(response.status, 200);
        assert!(
            response.body.starts_with("{\"cameras\""),
            "{}",
            response.body
        );
        let head = get("HEAD /metrics HTTP/1.1\r\n\r\n");
        let bytes = String::from_utf8(head.to_bytes()).unwrap_or_default();
        assert!(bytes.ends_with("\r\n\r\n"), "{bytes}");
        assert!(bytes.contains(&format!("Content-Length: {}", head.body.len())));
        assert_eq!(get("GET / HTTP/1.1\r\n\r\n").status, 404);
        assert_eq!(get("POST /metrics HTTP/1.1\r\n\r\n").status, 405);
        assert_eq!(get("\r\n").status, 400);
    }

    #[test]
    fn a_taken_port_is_a_start_error_naming_the_key() {
        let metrics = Arc::new(Metrics::new("cpu", "fp32", &[]));
        let server = HttpServer::start("127.0.0.1:0", Arc::clone(&metrics)).expect("start");
        let taken = server.address().to_string();
        let message = HttpServer::start(&taken, metrics)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains(&format!("http.bind = `{taken}`")),
            "{message}"
        );
        server.stop();
    }
}
