//! `[http]`: `/metrics` (OpenMetrics text), `/health`, the events API (`api`), the console's
//! live streams (`live`: each camera's video, changed events) and the console page itself, on
//! axum on a small tokio runtime of its own thread. Reads [`Metrics`], the event store and the
//! live views; never touches frames or the engine.

mod api;
mod collect;
mod listener;
mod live;
mod model;
mod train;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::Listener as _;
use tokio::sync::oneshot;

use crate::pipeline::metrics::Metrics;
use crate::pipeline::sinks::live::LiveView;
use crate::store::Changes;

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

/// What the endpoints read.
pub struct Served {
    pub metrics: Arc<Metrics>,
    /// The event store's folder (`[storage] path`), when events are kept.
    pub storage: Option<PathBuf>,
    /// The live model (`/api/cameras`, `POST /api/model`).
    pub model: Arc<dyn crate::pipeline::model::ModelControl>,
    /// Training from the running pipeline (`POST /api/train`); `None`: not offered.
    pub train: Option<Arc<crate::pipeline::training::TrainSlot>>,
    /// Who may use it (`[http.auth]`); `None`: anyone who reaches it (loopback only).
    pub auth: Option<Arc<crate::pipeline::auth::Auth>>,
    /// Each camera's live view (`[http] live`, with an encoder), by camera name.
    pub live: HashMap<String, Arc<LiveView>>,
    /// Each camera's frame collection for training (with `[storage]`), by camera name.
    pub collect: HashMap<String, Arc<crate::pipeline::collecting::CollectSlot>>,
    /// Ids of changed events (the writer's rows, verdicts), for the live event list.
    pub event_feed: Changes,
    /// Set when the server stops: long-lived answers (the event stream) end on it.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// How long a camera may be offline (reconnecting) before `/health` says 503.
    pub offline_grace: std::time::Duration,
}

/// The running endpoint; [`HttpServer::stop`] ends it.
pub struct HttpServer {
    address: SocketAddr,
    served: Arc<Served>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `bind` (`ip:port`) at once, so a taken port fails the start, then serves on a thread,
    /// at most `max_connections` connections at once.
    pub fn start(bind: &str, max_connections: usize, served: Served) -> Result<Self, HttpError> {
        Self::start_timed(bind, max_connections, HEADER_READ_TIMEOUT, served)
    }

    /// [`HttpServer::start`] with another header read timeout (tests).
    fn start_timed(
        bind: &str,
        max_connections: usize,
        header_timeout: Duration,
        served: Served,
    ) -> Result<Self, HttpError> {
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
        let served = Arc::new(served);
        let app = router(Arc::clone(&served));
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                runtime.block_on(serve(
                    listener,
                    max_connections,
                    header_timeout,
                    app,
                    stopped,
                ))
            })
            .map_err(HttpError::Start)?;
        Ok(Self {
            address,
            served,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Where it listens (the real port when the configuration said 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Its credentials (`[http.auth]`), for a reload to read again.
    pub fn auth(&self) -> Option<Arc<crate::pipeline::auth::Auth>> {
        self.served.auth.clone()
    }

    /// Stops accepting, ends the open event streams, lets requests in progress finish, and ends
    /// the thread.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.served.stopping.send_replace(true);
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

/// How long a client may take to send a request's headers, or leave a kept-alive connection
/// idle before its next request: longer and the connection is closed, so connections that send
/// nothing (or trickle a request) cannot hold every place of `max_connections`.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a stop waits for requests in progress before it ends their connections.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Accepts connections until `stopped`, each served by hyper's HTTP/1 (with upgrades, for the
/// live view's websockets) under `header_timeout` ([`HEADER_READ_TIMEOUT`]); then lets requests
/// in progress finish for up to [`STOP_GRACE`].
async fn serve(
    listener: std::net::TcpListener,
    max_connections: usize,
    header_timeout: Duration,
    app: Router,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener::Capped::new(listener, max_connections),
        Err(e) => {
            log::warn!("http: cannot serve: {e}");
            return;
        }
    };
    let (stop_connections, stopping) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (connection, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stopped => break,
        };
        // Each request knows its client's address (the password-guess throttle counts by it).
        let service =
            hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
                app.clone(),
                move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    request
                        .extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    request
                },
            ));
        let mut stopping = stopping.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let io = hyper_util::rt::TokioIo::new(connection);
            let connection = builder.serve_connection(io, service).with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(e) = served {
                        log::debug!("http: connection: {e}");
                    }
                    return;
                }
                _ = stopping.changed() => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop_connections.send(true);
    let finished = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(STOP_GRACE, finished).await.is_err() {
        log::warn!(
            "http: {} connection(s) still busy after {} s; closed",
            connections.len(),
            STOP_GRACE.as_secs()
        );
    }
}

/// Every route (GET routes answer HEAD too).
fn router(served: Arc<Served>) -> Router {
    Router::new()
        .route("/", get(console))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .merge(api::routes())
        .merge(live::routes())
        .merge(collect::routes())
        .merge(model::routes())
        .merge(train::routes())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&served),
            guard,
        ))
        .with_state(served)
}

/// The user (or `token`) a request was signed in as, when `[http.auth]` is on.
#[derive(Clone, Debug)]
pub struct SignedIn(pub String);

/// Credential checks running at once, at most: one can be an argon2 hash (19 MiB, tens of ms), so
/// a flood of wrong passwords waits here instead of taking every core and that memory each.
static CHECKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// True unless the request carries an `Origin` (browsers send one with every cross-site request
/// and every POST) whose host differs from the `Host` it was sent to.
pub(super) fn same_origin(headers: &axum::http::HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|origin| origin.split_once("://"))
        .map(|(_, host)| host);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    origin_host.is_some() && origin_host == host
}

/// True when `Host` names this machine's loopback: `localhost` or a loopback IP literal, with or
/// without a port; also when there is no `Host` (HTTP/1.0 clients; browsers always send one).
pub(super) fn addressed_to_loopback(headers: &axum::http::HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((inside, _)) => inside,
            None => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses, when `[http.auth]` is off (the server is on loopback), requests addressed to any
/// other name (DNS rebinding: a page of another site whose name its owner points at 127.0.0.1
/// would otherwise be "same origin" here); refuses changes asked for by pages of other sites
/// (any method but GET and HEAD with a foreign `Origin`); then lets a request through when
/// `[http.auth]` is off, for `/health`, or with valid credentials; else 401 asking for Basic
/// credentials, or 429 for a client whose password guesses failed too often. Checking a password
/// (argon2) runs off the async thread.
async fn guard(
    axum::extract::State(served): axum::extract::State<Arc<Served>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if served.auth.is_none() && !addressed_to_loopback(request.headers()) {
        let host = request
            .headers()
            .get(header::HOST)
            .map(|host| String::from_utf8_lossy(host.as_bytes()).into_owned())
            .unwrap_or_default();
        return api::error(
            StatusCode::FORBIDDEN,
            format!(
                "without [http.auth] this server answers only requests addressed to localhost or a loopback address, not to `{host}`; set [http.auth] to serve other names (a proxy's, say)"
            ),
        );
    }
    if !same_origin(request.headers()) {
        // A page of another site can make the browser send a request here (with the user's
        // credentials, or to a loopback address); it may not change anything.
        if !matches!(
            *request.method(),
            axum::http::Method::GET | axum::http::Method::HEAD
        ) {
            return api::error(
                StatusCode::FORBIDDEN,
                "only pages of this server may change things here (Origin differs from Host)"
                    .into(),
            );
        }
    }
    if served.auth.is_none() || request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(String::from);
    if let Some(auth) = &served.auth
        && auth.is_metrics_token(authorization.as_deref())
    {
        if request.uri().path() == "/metrics" {
            return next.run(request).await;
        }
        return api::error(
            StatusCode::FORBIDDEN,
            "this token may read only /metrics (http.auth.metrics_token_file)".into(),
        );
    }
    // Tokens and credentials verified before are answered at once; only a password not seen
    // yet waits for one of the few argon2 places.
    let quick = served
        .auth
        .as_ref()
        .and_then(|auth| auth.identify_quickly(authorization.as_deref()));
    let identity = match quick {
        Some(decided) => decided,
        None => {
            let client = request
                .extensions()
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|info| info.0.ip());
            let throttle = served.auth.as_ref().map(|auth| &auth.throttle);
            let held_back =
                || throttle.and_then(|t| t.check(client, std::time::Instant::now()).err());
            if let Some(wait) = held_back() {
                return too_many_guesses(wait);
            }
            let checking = Arc::clone(&served);
            let slot = CHECKS.acquire().await.ok();
            // Again once a place is free: guesses sent at once all passed the first look while
            // the ones before them were still being hashed.
            if let Some(wait) = held_back() {
                return too_many_guesses(wait);
            }
            let identity = tokio::task::spawn_blocking(move || {
                checking
                    .auth
                    .as_ref()
                    .and_then(|auth| auth.identify(authorization.as_deref()))
            })
            .await
            .ok()
            .flatten();
            drop(slot);
            if identity.is_none()
                && let Some(throttle) = throttle
            {
                throttle.failed(client, std::time::Instant::now());
            }
            identity
        }
    };
    if let Some(identity) = identity {
        // Who signed in, for what they record (a verdict's author).
        request.extensions_mut().insert(SignedIn(identity));
        return next.run(request).await;
    }
    let mut response = api::error(
        StatusCode::UNAUTHORIZED,
        "sign in: HTTP Basic with a user of http.auth.password_file, or Authorization: Bearer <token>".into(),
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Basic realm=\"stpm\", charset=\"UTF-8\""),
    );
    response
}

/// 429 for a client address whose password checks failed too often, with `Retry-After`.
fn too_many_guesses(wait: Duration) -> Response {
    let seconds = wait.as_secs().max(1);
    let mut response = api::error(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many wrong passwords from this address: try again in {seconds} s"),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, axum::http::HeaderValue::from(seconds));
    response
}

async fn metrics(axum::extract::State(served): axum::extract::State<Arc<Served>>) -> Response {
    (
        [
            (header::CONTENT_TYPE, super::metrics::CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        served.metrics.render(),
    )
        .into_response()
}

/// `{"cameras":[{"camera":…,"state":…}],"status":"ok"|"unhealthy"}`: 200 when every camera is
/// online or has ended, else 503.
async fn health(axum::extract::State(served): axum::extract::State<Arc<Served>>) -> Response {
    let (healthy, json) = served.metrics.health(served.offline_grace);
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        format!("{json}\n"),
    )
        .into_response()
}

/// The operator's console: one page (embedded in the binary) over the events API.
async fn console() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("console/index.html"),
    )
        .into_response()
}

async fn not_found() -> Response {
    api::error(
        StatusCode::NOT_FOUND,
        "not found: try /metrics, /health or /api/events".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::auth::tests::basic;
    use crate::pipeline::metrics::CameraState;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// What the endpoints read, with `metrics` and everything else off or empty: no event
    /// store, no auth, no live views.
    pub(super) fn served(metrics: Arc<Metrics>) -> Served {
        Served {
            metrics,
            storage: None,
            model: fixed_model(""),
            train: None,
            auth: None,
            live: Default::default(),
            collect: Default::default(),
            event_feed: tokio::sync::broadcast::channel(4).0,
            stopping: Default::default(),
            offline_grace: std::time::Duration::ZERO,
        }
    }

    /// A live model that stays: it refuses every swap as a missing folder.
    struct Fixed(crate::pipeline::model::ModelInfo);

    impl crate::pipeline::model::ModelControl for Fixed {
        fn live_model(&self) -> crate::pipeline::model::ModelInfo {
            self.0.clone()
        }

        fn swap(
            &self,
            bundle: &std::path::Path,
        ) -> Result<crate::pipeline::model::Swapped, crate::pipeline::model::SwapError> {
            Err(crate::pipeline::model::SwapError::Missing(
                bundle.to_path_buf(),
            ))
        }
    }

    /// A model with id `id` that refuses every swap.
    pub(super) fn fixed_model(id: &str) -> Arc<dyn crate::pipeline::model::ModelControl> {
        Arc::new(Fixed(crate::pipeline::model::ModelInfo {
            id: id.into(),
            name: "demo".into(),
            bundle: "engines/demo".into(),
            precision: "fp32".into(),
        }))
    }

    /// (status, content type, body) of `method path` on `app`.
    pub(super) async fn call(
        app: &Router,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, String, String) {
        call_with(app, method, path, body, &[]).await
    }

    /// [`call`] with extra request headers.
    pub(super) async fn call_with(
        app: &Router,
        method: &str,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String, String) {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Body::from(body.to_string())).expect("request");
        let response = app.clone().oneshot(request).await.expect("response");
        let status = response.status().as_u16();
        let kind = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, kind, String::from_utf8_lossy(&bytes).into_owned())
    }

    pub(super) fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn the_model_endpoint_names_the_live_model_and_passes_refusals_on() {
        let metrics = Arc::new(Metrics::new("cpu", "fp32", &["line1".into()]));
        metrics.set_model("0123456789ab", "demo", "int8");
        let app = router(Arc::new(Served {
            model: fixed_model("0123456789ab"),
            ..served(Arc::clone(&metrics))
        }));
        runtime().block_on(async {
            let (status, _, body) = call(&app, "GET", "/api/model", "").await;
            assert_eq!(status, 200);
            assert!(body.contains(r#""id":"0123456789ab""#), "{body}");
            let (status, _, body) = call(&app, "POST", "/api/model", "{\"bundel\": 1}").await;
            assert_eq!(status, 400, "{body}");
            assert!(body.contains("expected `bundle`"), "{body}");
            let (status, _, body) = call(
                &app,
                "POST",
                "/api/model",
                r#"{"bundle": "engines/nowhere"}"#,
            )
            .await;
            assert_eq!(status, 422, "{body}");
            assert!(
                body.contains("engines/nowhere: no such bundle folder"),
                "{body}"
            );
            // A page of another site may read but not change.
            let foreign = [
                ("origin", "http://evil.example"),
                ("host", "127.0.0.1:9090"),
            ];
            let (status, _, body) =
                call_with(&app, "POST", "/api/model", r#"{"bundle": "x"}"#, &foreign).await;
            assert_eq!(status, 403, "{body}");
            assert_eq!(
                call_with(&app, "GET", "/api/model", "", &foreign).await.0,
                200
            );
            let own = [
                ("origin", "http://127.0.0.1:9090"),
                ("host", "127.0.0.1:9090"),
            ];
            let (status, _, body) =
                call_with(&app, "POST", "/api/model", r#"{"bundle": "x"}"#, &own).await;
            assert_eq!(status, 422, "{body}");
            // DNS rebinding: a page of evil.example, its name now pointing at 127.0.0.1, is
            // "same origin" by its headers; without [http.auth] only loopback names are served.
            let rebound = [
                ("origin", "http://evil.example:9090"),
                ("host", "evil.example:9090"),
            ];
            for (method, body) in [("POST", r#"{"bundle": "x"}"#), ("GET", "")] {
                let (status, _, answer) =
                    call_with(&app, method, "/api/model", body, &rebound).await;
                assert_eq!(status, 403, "{method}: {answer}");
                assert!(
                    answer.contains("only requests addressed to localhost or a loopback address, not to `evil.example:9090`"),
                    "{answer}"
                );
            }
            for host in ["localhost:9090", "LOCALHOST", "127.0.0.1", "127.0.0.2:80", "[::1]:9090"] {
                let (status, _, answer) =
                    call_with(&app, "GET", "/api/model", "", &[("host", host)]).await;
                assert_eq!(status, 200, "{host}: {answer}");
            }
            for host in ["192.168.1.5:9090", "[::2]:9090", "localhost.evil.example", "[::1"] {
                assert_eq!(
                    call_with(&app, "GET", "/health", "", &[("host", host)]).await.0,
                    403,
                    "{host}"
                );
            }
            let (_, _, body) = call(&app, "GET", "/metrics", "").await;
            assert!(
                body.contains("stpm_model_info{id=\"0123456789ab\",bundle=\"demo\"} 1"),
                "{body}"
            );
            assert!(body.contains("stpm_engine_info{provider=\"cpu\",precision=\"int8\"} 1"));
            assert!(body.contains("stpm_model_swaps_total 0"), "{body}");
        });
        metrics.set_model("ba9876543210", "line1", "fp32");
        runtime().block_on(async {
            let (_, _, body) = call(&app, "GET", "/metrics", "").await;
            assert!(body.contains("stpm_model_swaps_total 1"), "{body}");
            assert!(
                body.contains("id=\"ba9876543210\",bundle=\"line1\""),
                "{body}"
            );
        });
    }

    #[test]
    fn routes_metrics_health_and_errors() {
        let metrics = Arc::new(Metrics::new("cpu", "fp32", &["line1".into()]));
        let app = router(Arc::new(Served {
            model: fixed_model("demo"),
            ..served(Arc::clone(&metrics))
        }));
        runtime().block_on(async {
            let (status, kind, body) = call(&app, "GET", "/metrics", "").await;
            assert_eq!(
                (status, kind.as_str()),
                (200, super::super::metrics::CONTENT_TYPE)
            );
            assert!(body.contains("stpm_engine_info{provider=\"cpu\",precision=\"fp32\"} 1"));
            let (status, _, body) = call(&app, "GET", "/health", "").await;
            assert_eq!(status, 503);
            assert!(body.contains("\"starting\""), "{body}");
            if let Some(camera) = metrics.camera("line1") {
                camera.set_state(CameraState::Online);
            }
            let (status, _, body) = call(&app, "GET", "/health?verbose=1", "").await;
            assert_eq!(status, 200);
            assert!(body.starts_with("{\"cameras\""), "{body}");
            let (status, _, body) = call(&app, "HEAD", "/metrics", "").await;
            assert_eq!((status, body.as_str()), (200, ""));
            // The console page, and the API paths its script calls.
            let (status, kind, body) = call(&app, "GET", "/", "").await;
            assert_eq!((status, kind.as_str()), (200, "text/html; charset=utf-8"));
            for used in [
                "/api/cameras",
                "/api/events?limit=",
                "/api/events/stream",
                "camera.live",
                "/verdict",
                "snapshot_url",
                "clip_url",
                "/collect",
                "/collect/not-a-defect",
                "/api/train",
            ] {
                assert!(body.contains(used), "{used}");
            }
            // The live streams: no such camera; no event store.
            let (status, _, body) = call(&app, "GET", "/api/cameras/nowhere/live", "").await;
            assert_eq!(status, 404);
            assert!(body.contains("camera nowhere is not configured"), "{body}");
            let (status, _, body) = call(&app, "GET", "/api/events/stream", "").await;
            assert_eq!(status, 404);
            assert!(body.contains("[storage] is off"), "{body}");
            let (status, kind, body) = call(&app, "GET", "/nowhere", "").await;
            assert_eq!((status, kind.as_str()), (404, "application/json"));
            assert!(body.contains("\"error\""), "{body}");
            assert_eq!(call(&app, "POST", "/metrics", "").await.0, 405);
        });
    }

    /// `[http.auth]` with the auth tests' files (user anna, tokens t0ken and scr4pe for metrics).
    fn signed_in_only(dir: &std::path::Path) -> Option<Arc<crate::pipeline::auth::Auth>> {
        crate::pipeline::auth::Auth::load(&crate::pipeline::auth::tests::files(dir), "0.0.0.0:9090")
            .expect("load")
            .map(Arc::new)
    }

    #[test]
    fn with_auth_only_health_is_open() {
        let dir = tempfile::tempdir().expect("dir");
        let auth = signed_in_only(dir.path());
        let event = crate::alerts::AlertEvent::sample("e1", "line1", 1.0, 0.9);
        crate::store::EventStore::open(dir.path())
            .and_then(|store| store.record(&event, "m", None, 1.0))
            .expect("an event");
        let app = router(Arc::new(Served {
            storage: Some(dir.path().to_path_buf()),
            auth,
            ..served(Arc::new(Metrics::new("cpu", "fp32", &[])))
        }));
        runtime().block_on(async {
            let (status, _, body) = call(&app, "GET", "/metrics", "").await;
            assert_eq!(status, 401, "{body}");
            let request = Request::builder()
                .uri("/api/cameras")
                .body(Body::empty())
                .expect("request");
            let response = app.clone().oneshot(request).await.expect("response");
            assert_eq!(
                response
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok()),
                Some("Basic realm=\"stpm\", charset=\"UTF-8\"")
            );
            assert_eq!(call(&app, "GET", "/health", "").await.0, 200);
            let (status, _, _) = call_with(
                &app,
                "GET",
                "/metrics",
                "",
                &[("authorization", &basic("anna:secret"))],
            )
            .await;
            assert_eq!(status, 200);
            let wrong = basic("anna:guess");
            let (status, _, _) =
                call_with(&app, "GET", "/metrics", "", &[("authorization", &wrong)]).await;
            assert_eq!(status, 401);
            let (status, _, _) = call_with(
                &app,
                "GET",
                "/api/cameras",
                "",
                &[("authorization", "Bearer t0ken")],
            )
            .await;
            assert_eq!(status, 200);
            // A verdict's author is who signed in, not what the body claims.
            let (status, _, body) = call_with(
                &app,
                "POST",
                "/api/events/e1/verdict",
                r#"{"verdict":"defect","by":"mallory"}"#,
                &[("authorization", &basic("anna:secret"))],
            )
            .await;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains(r#""verdict_by":"anna""#), "{body}");
            // A scrape token reads /metrics and nothing else.
            let scrape = [("authorization", "Bearer scr4pe")];
            assert_eq!(call_with(&app, "GET", "/metrics", "", &scrape).await.0, 200);
            for (method, path) in [
                ("GET", "/api/cameras"),
                ("POST", "/api/model"),
                ("GET", "/"),
            ] {
                let (status, _, body) = call_with(&app, method, path, "", &scrape).await;
                assert_eq!(status, 403, "{method} {path}: {body}");
                assert!(body.contains("may read only /metrics"), "{body}");
            }
            // With [http.auth], other host names are served (a proxy's, say).
            let (status, _, _) = call_with(
                &app,
                "GET",
                "/api/cameras",
                "",
                &[("authorization", "Bearer t0ken"), ("host", "line.example")],
            )
            .await;
            assert_eq!(status, 200);
        });
    }

    /// `GET /metrics` with `authorization`, from a client at `address`.
    fn metrics_from(address: [u8; 4], authorization: &str) -> Request<Body> {
        Request::builder()
            .uri("/metrics")
            .header(header::AUTHORIZATION, authorization)
            .extension(axum::extract::ConnectInfo(SocketAddr::from((
                address, 50000,
            ))))
            .body(Body::empty())
            .expect("request")
    }

    #[test]
    fn a_client_guessing_passwords_is_held_back_without_hashing() {
        use crate::pipeline::auth::{FAILURE_WINDOW, FAILURES_ALLOWED};
        let dir = tempfile::tempdir().expect("dir");
        let auth = signed_in_only(dir.path());
        let app = router(Arc::new(Served {
            auth,
            ..served(Arc::new(Metrics::new("cpu", "fp32", &[])))
        }));
        let ask = |credentials: String| {
            let app = app.clone();
            async move {
                let request = metrics_from([10, 0, 0, 7], &credentials);
                app.oneshot(request).await.expect("response")
            }
        };
        runtime().block_on(async {
            // Verified once, so remembered.
            assert_eq!(ask(basic("anna:secret")).await.status(), 200);
            for guess in 0..FAILURES_ALLOWED {
                let answer = ask(basic(&format!("anna:guess{guess}"))).await;
                assert_eq!(answer.status(), 401, "guess {guess}");
            }
            let held = ask(basic("anna:one-more")).await;
            assert_eq!(held.status(), 429);
            let wait: u64 = held
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            assert!(
                (1..=FAILURE_WINDOW.as_secs()).contains(&wait),
                "Retry-After {wait}"
            );
            // What needs no hash still answers: a token, a password verified before.
            assert_eq!(ask("Bearer t0ken".into()).await.status(), 200);
            assert_eq!(ask(basic("anna:secret")).await.status(), 200);
        });
    }

    #[test]
    fn guesses_sent_at_once_are_held_back_as_well() {
        use crate::pipeline::auth::FAILURES_ALLOWED;
        let dir = tempfile::tempdir().expect("dir");
        let app = router(Arc::new(Served {
            auth: signed_in_only(dir.path()),
            ..served(Arc::new(Metrics::new("cpu", "fp32", &[])))
        }));
        let guesses = 3 * FAILURES_ALLOWED as usize;
        let statuses = runtime().block_on(async {
            let asked = (0..guesses).map(|guess| {
                let request = metrics_from([10, 0, 0, 9], &basic(&format!("anna:guess{guess}")));
                let app = app.clone();
                async move { app.oneshot(request).await.expect("response").status() }
            });
            futures_util::future::join_all(asked).await
        });
        let hashed = statuses.iter().filter(|s| s.as_u16() == 401).count();
        let held = statuses.iter().filter(|s| s.as_u16() == 429).count();
        assert_eq!(hashed + held, guesses, "{statuses:?}");
        // At most the allowance and the checks in progress when it ran out (two at once).
        assert!(
            hashed <= FAILURES_ALLOWED as usize + 2,
            "{hashed} of {guesses} guesses sent at once were hashed"
        );
    }

    /// Percent-encodes every byte that is not unreserved, so any bytes make a valid URI part.
    fn encoded(bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|&b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// Any method, route, path segment, query and body: an answer, never a panic or a 500.
        #[test]
        fn any_request_gets_an_answer_that_is_not_a_server_error(
            method in proptest::sample::select(vec!["GET", "HEAD", "POST", "PUT", "DELETE"]),
            route in proptest::sample::select(vec![
                "/", "/metrics", "/health", "/api/events", "/api/events/{}",
                "/api/events/{}/snapshot.jpg", "/api/events/{}/clean.jpg",
                "/api/events/{}/clip.mp4", "/api/events/{}/verdict", "/api/cameras",
                "/api/cameras/{}/live", "/api/cameras/{}/collect", "/api/model", "/api/train", "/{}",
                "/api/{}/{}",
            ]),
            segment in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            query in proptest::collection::vec(
                (proptest::collection::vec(proptest::num::u8::ANY, 0..12),
                 proptest::collection::vec(proptest::num::u8::ANY, 0..24)),
                0..5,
            ),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            json_body in proptest::bool::ANY,
        ) {
            let dir = tempfile::tempdir().expect("dir");
            crate::store::EventStore::open(dir.path()).expect("store");
            let app = router(Arc::new(Served {
                storage: Some(dir.path().to_path_buf()),
                // No camera: /health answers 200, not 503 for a camera still starting.
                ..served(Arc::new(Metrics::new("cpu", "fp32", &[])))
            }));
            let mut path = route.replace("{}", &encoded(&segment));
            if !query.is_empty() {
                let pairs: Vec<String> = query
                    .iter()
                    .map(|(k, v)| format!("{}={}", encoded(k), encoded(v)))
                    .collect();
                path = format!("{path}?{}", pairs.join("&"));
            }
            let body = if json_body {
                format!(r#"{{"verdict":"{}","by":"x"}}"#, String::from_utf8_lossy(&body).escape_default())
            } else {
                String::from_utf8_lossy(&body).into_owned()
            };
            let (status, _, answer) = runtime().block_on(call(&app, method, &path, &body));
            proptest::prop_assert!(
                (200..500).contains(&status),
                "{method} {path}: {status} {answer}"
            );
        }
    }

    #[test]
    fn a_taken_port_is_a_start_error_naming_the_key() {
        let fresh = || served(Arc::new(Metrics::new("cpu", "fp32", &[])));
        let server = HttpServer::start("127.0.0.1:0", 8, fresh()).expect("start");
        let taken = server.address().to_string();
        let message = HttpServer::start(&taken, 8, fresh())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains(&format!("http.bind = `{taken}`")),
            "{message}"
        );
        server.stop();
    }

    /// A TCP connection to `address` whose reads give up after `timeout`.
    fn connect_to(address: SocketAddr, timeout: std::time::Duration) -> std::net::TcpStream {
        let stream = std::net::TcpStream::connect(address).expect("connect");
        stream.set_read_timeout(Some(timeout)).expect("timeout");
        stream
    }

    /// Sends `GET /health` (HTTP/1.0) and reads the answer until the server closes or the read
    /// times out.
    fn ask_health(stream: &mut std::net::TcpStream) -> String {
        use std::io::{Read, Write};
        stream
            .write_all(b"GET /health HTTP/1.0\r\n\r\n")
            .expect("send");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[test]
    fn connections_beyond_the_cap_wait_for_a_place() {
        use std::io::Read;
        let server = HttpServer::start(
            "127.0.0.1:0",
            2,
            served(Arc::new(Metrics::new("cpu", "fp32", &[]))),
        )
        .expect("start");
        let address = server.address();
        let connect = || connect_to(address, std::time::Duration::from_millis(700));
        // Two idle connections take both places.
        let idle: Vec<_> = (0..2).map(|_| connect()).collect();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut third = connect();
        let waiting = ask_health(&mut third);
        assert!(waiting.is_empty(), "served beyond the cap: {waiting}");
        // One closes: the third is served.
        drop(idle);
        third
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let mut answer = Vec::new();
        let _ = third.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
        server.stop();
    }

    #[test]
    fn silent_and_trickling_connections_are_closed_and_free_their_places() {
        use std::io::{Read, Write};
        use std::time::Duration;
        let server = HttpServer::start_timed(
            "127.0.0.1:0",
            2,
            Duration::from_millis(300),
            served(Arc::new(Metrics::new("cpu", "fp32", &[]))),
        )
        .expect("start");
        let address = server.address();
        let connect = || connect_to(address, Duration::from_secs(5));
        // One sends nothing, one half a request: both take a place, and both are closed.
        let mut silent = connect();
        let mut trickling = connect();
        trickling
            .write_all(b"GET /health HTTP/1.1\r\nHost: x")
            .expect("send");
        for stream in [&mut silent, &mut trickling] {
            let mut answer = Vec::new();
            let started = std::time::Instant::now();
            let read = stream.read_to_end(&mut answer);
            assert!(
                read.is_ok() && started.elapsed() < Duration::from_secs(4),
                "not closed by the server: {read:?} after {:?}",
                started.elapsed()
            );
            let answer = String::from_utf8_lossy(&answer);
            assert!(!answer.contains("200 OK"), "{answer}");
        }
        // Their places are free again: a new client is served.
        let answer = ask_health(&mut connect());
        assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
        server.stop();
    }
}
