//! The console's live streams: `GET /api/cameras/{camera}/live`, a WebSocket carrying the camera's
//! video as fragmented MP4 (a JSON hello first: codec, size, the first frame's unix time), and
//! `GET /api/events/stream`, server-sent events with each changed event as the API shows it.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::broadcast::error::RecvError;

use super::Served;
use super::api::{camera_lacks, error, event_json, with_store};
use crate::pipeline::sinks::live::{LiveMessage, LiveStream};

/// A comment line on a quiet event stream this often, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How long one message to a live viewer may wait for the viewer to read: a viewer that stops
/// reading is closed after that, and its connection's place freed.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest message a viewer may send (it has nothing to say but "close").
const INCOMING_LIMIT: usize = 4096;

pub(super) fn routes() -> Router<Arc<Served>> {
    Router::new()
        .route("/api/cameras/{camera}/live", get(live))
        .route("/api/events/stream", get(events))
}

/// Upgrades to a WebSocket that streams `camera`'s live view until either side closes. Browsers
/// let any page open a WebSocket anywhere (with the user's credentials), so one from a page of
/// another origin is refused.
async fn live(
    State(served): State<Arc<Served>>,
    Path(camera): Path<String>,
    headers: axum::http::HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if !super::same_origin(&headers) {
        return error(
            StatusCode::FORBIDDEN,
            "the live view is only for pages of this server (Origin differs from Host)".into(),
        );
    }
    let Some(view) = served.live.get(&camera).cloned() else {
        return camera_lacks(
            &served,
            &camera,
            "has no live view (http.live is off, or no H.264 encoder is installed)",
        );
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("a WebSocket is needed: {}", rejection.body_text()),
            );
        }
    };
    let joined = tokio::task::spawn_blocking(move || view.join()).await;
    match joined {
        Ok(Ok(stream)) => upgrade
            .max_message_size(INCOMING_LIMIT)
            .max_frame_size(INCOMING_LIMIT)
            .on_upgrade(move |socket| forward(socket, stream)),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Sends the viewer's messages until its stream ends or the browser goes; dropping the stream
/// leaves the view.
async fn forward(mut socket: WebSocket, mut stream: LiveStream) {
    loop {
        tokio::select! {
            message = stream.messages.recv() => {
                let message = match message {
                    Some(LiveMessage::Hello(hello)) => match serde_json::to_string(&hello) {
                        Ok(text) => Message::Text(text.into()),
                        Err(_) => break,
                    },
                    Some(LiveMessage::Media(bytes)) => Message::Binary(bytes.into()),
                    None => break,
                };
                match tokio::time::timeout(SEND_TIMEOUT, socket.send(message)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break,
                    Err(_) => {
                        let waited = SEND_TIMEOUT.as_secs();
                        log::info!("http: a live viewer read nothing for {waited} s; closed");
                        return;
                    }
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Close(None))).await;
}

/// Server-sent events: `event` with an event's JSON each time it changes (a new event, a new
/// peak, its end, its clip, a verdict), `resync` when this listener fell behind and should load
/// the list again.
async fn events(State(served): State<Arc<Served>>) -> Response {
    if served.storage.is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "events are not kept: [storage] is off".into(),
        );
    }
    let changes = served.event_feed.subscribe();
    let stopping = served.stopping.subscribe();
    let stream = futures_util::stream::unfold(
        (changes, stopping, served),
        |(mut changes, mut stopping, served)| async move {
            loop {
                // The server stopping ends the stream (a graceful shutdown waits for it).
                let received = tokio::select! {
                    received = changes.recv() => received,
                    _ = stopping.wait_for(|stopping| *stopping) => return None,
                };
                let id = match received {
                    Ok(id) => id,
                    Err(RecvError::Lagged(_)) => {
                        let event = Event::default().event("resync").data("");
                        let state = (changes, stopping, served);
                        return Some((Ok::<_, std::convert::Infallible>(event), state));
                    }
                    Err(RecvError::Closed) => return None,
                };
                let found = with_store(&served, move |store| {
                    store.get(&id).map_err(super::api::internal)
                })
                .await;
                // An event that cannot be read now is skipped; the next change brings it.
                if let Ok(Some(event)) = found {
                    let data = event_json(&event).to_string();
                    let event = Event::default().event("event").data(data);
                    return Some((Ok(event), (changes, stopping, served)));
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::tests::{call, call_with, runtime, served};
    use super::super::{Served, router};
    use crate::pipeline::metrics::Metrics;
    use crate::pipeline::sinks::live::LiveView;

    /// `GET` of line1's live view from a page at `origin`, on a server at 127.0.0.1:9090.
    async fn from_page_of(app: &axum::Router, origin: &str) -> (u16, String) {
        let headers = [("host", "127.0.0.1:9090"), ("origin", origin)];
        let (status, _, body) =
            call_with(app, "GET", "/api/cameras/line1/live", "", &headers).await;
        (status, body)
    }

    #[test]
    fn the_live_view_wants_a_websocket_from_a_page_of_this_server() {
        let metrics = Metrics::new("cpu", "fp32", &["line1".into(), "line2".into()]);
        let app = router(Arc::new(Served {
            live: [("line1".to_string(), LiveView::new("line1"))].into(),
            ..served(Arc::new(metrics))
        }));
        runtime().block_on(async {
            let (status, body) = from_page_of(&app, "http://elsewhere.example").await;
            assert_eq!(status, 403, "{body}");
            // Same origin, but a plain GET: not a WebSocket.
            let (status, body) = from_page_of(&app, "http://127.0.0.1:9090").await;
            assert_eq!(status, 400, "{body}");
            assert!(body.contains("WebSocket"), "{body}");
            // A configured camera without a live view.
            let (status, _, body) = call(&app, "GET", "/api/cameras/line2/live", "").await;
            assert_eq!(status, 404);
            assert!(body.contains("has no live view"), "{body}");
        });
    }
}
