//! The network side of a run: the shared [`Metrics`], the `[http]` endpoints and the RTSP server,
//! started before the cameras (a taken port fails the start) and stopped after their workers.

use std::sync::Arc;

use crate::pipeline::collecting::CollectSlot;
use crate::pipeline::config::PipelineConfig;
use crate::pipeline::http::{HttpError, HttpServer, Served};
use crate::pipeline::metrics::{CameraMetrics, Metrics};
use crate::pipeline::model::{ModelControl, ModelSlot};
use crate::pipeline::sinks::encoder::Encoder;
use crate::pipeline::sinks::live::LiveView;
use crate::pipeline::sinks::rtsp::{RtspError, RtspFeed, RtspServer};
use crate::pipeline::training::TrainSlot;
use crate::store::Changes;

/// Changed events kept for a slow listener of the console's live list before it skips some.
const EVENT_FEED: usize = 256;

/// What the workers feed and the servers read.
pub struct LiveOutputs {
    pub metrics: Arc<Metrics>,
    http: Option<HttpServer>,
    rtsp: Option<RtspServer>,
    /// One per camera, in configuration order; taken by the workers.
    feeds: Vec<Option<RtspFeed>>,
    /// The console's live view of each camera, in configuration order (`[http] live`).
    views: Vec<Option<Arc<LiveView>>>,
    /// Each camera's frame collection (with `[http]` and `[storage]`), in configuration order.
    slots: Vec<Option<Arc<CollectSlot>>>,
    /// Changed events, for the console's live list.
    event_feed: Changes,
    /// Training from the running pipeline (`POST /api/train`, with `[http]`).
    train: Option<Arc<TrainSlot>>,
}

/// What one camera's worker gets.
pub struct CameraOutputs {
    pub metrics: Arc<CameraMetrics>,
    pub rtsp: Option<RtspFeed>,
    pub live: Option<Arc<LiveView>>,
    /// Frame collection for training (`POST /api/cameras/{camera}/collect`).
    pub collect: Option<Arc<CollectSlot>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Rtsp(#[from] RtspError),
    #[error(transparent)]
    Auth(#[from] crate::pipeline::auth::AuthError),
}

impl LiveOutputs {
    /// The HTTP server's credentials (`[http.auth]`), for a reload to read again.
    pub fn auth(&self) -> Option<Arc<crate::pipeline::auth::Auth>> {
        self.http.as_ref().and_then(HttpServer::auth)
    }

    /// Starts what `config` enables; `provider` is the execution provider reported in /metrics,
    /// `models` the live model (`/api/cameras`, `POST /api/model`), `encoder` the H.264 encoder of
    /// the video outputs (RTSP starts only with one).
    pub fn start(
        config: &PipelineConfig,
        provider: &str,
        models: Arc<ModelSlot>,
        encoder: Option<&Encoder>,
    ) -> Result<Self, LiveError> {
        let cameras: Vec<String> = config.camera.iter().map(|c| c.name.clone()).collect();
        let precision = models.live_model().precision;
        let metrics = Arc::new(Metrics::new(provider, &precision, &cameras));
        if let Some(encoder) = encoder {
            metrics.set_encoder(encoder.element());
        }
        let (event_feed, _) = tokio::sync::broadcast::channel(EVENT_FEED);
        // The live view needs the encode, so an encoder.
        let views: Vec<Option<Arc<LiveView>>> = cameras
            .iter()
            .map(|camera| {
                (config.http.enabled && config.http.live && encoder.is_some())
                    .then(|| LiveView::new(camera))
            })
            .collect();
        // Collections go under the data folder, so they need the HTTP API and `[storage]`.
        let slots: Vec<Option<Arc<CollectSlot>>> = config
            .camera
            .iter()
            .map(|camera| {
                let alerts = camera.alerts.resolve(&config.alerts);
                (config.http.enabled && config.storage.enabled).then(|| {
                    Arc::new(CollectSlot::new(
                        &camera.name,
                        &camera.source,
                        config.storage.path.join("collect").join(&camera.name),
                        alerts.clone(),
                    ))
                })
            })
            .collect();
        let train = config.http.enabled.then(|| {
            Arc::new(TrainSlot::new(
                Arc::clone(&models),
                config
                    .storage
                    .enabled
                    .then(|| config.storage.path.join("collect")),
                cameras.clone(),
            ))
        });
        let http = if config.http.enabled {
            let auth = crate::pipeline::auth::Auth::load(&config.http.auth, &config.http.bind)?
                .map(Arc::new);
            let served = Served {
                auth,
                metrics: Arc::clone(&metrics),
                storage: config.storage.enabled.then(|| config.storage.path.clone()),
                model: models,
                train: train.clone(),
                live: cameras
                    .iter()
                    .zip(&views)
                    .filter_map(|(camera, view)| Some((camera.clone(), Arc::clone(view.as_ref()?))))
                    .collect(),
                collect: cameras
                    .iter()
                    .zip(&slots)
                    .filter_map(|(camera, slot)| Some((camera.clone(), Arc::clone(slot.as_ref()?))))
                    .collect(),
                event_feed: event_feed.clone(),
                stopping: Default::default(),
                offline_grace: std::time::Duration::from_secs_f64(
                    config.http.offline_grace_seconds,
                ),
            };
            let server = HttpServer::start(&config.http.bind, config.http.max_connections, served)?;
            log::info!(
                "http: console at http://{0}/, metrics at http://{0}/metrics, health at http://{0}/health, events at http://{0}/api/events",
                server.address()
            );
            Some(server)
        } else {
            None
        };
        let (rtsp, feeds) = if encoder.is_some() && config.output.rtsp.enabled {
            let (server, feeds) = RtspServer::start(&config.output.rtsp, &cameras)?;
            for camera in &cameras {
                log::info!(
                    "rtsp: camera {camera} at rtsp://{}:{}/{camera}",
                    config.output.rtsp.bind,
                    server.port()
                );
            }
            (Some(server), feeds.into_iter().map(Some).collect())
        } else {
            (None, cameras.iter().map(|_| None).collect())
        };
        Ok(Self {
            metrics,
            http,
            rtsp,
            feeds,
            views,
            slots,
            event_feed,
            train,
        })
    }

    /// The outputs of the `index`-th camera (its RTSP feed only the first time).
    pub fn camera(&mut self, index: usize, name: &str) -> CameraOutputs {
        CameraOutputs {
            // Every configured camera has counters; the fallback only keeps this total.
            metrics: self
                .metrics
                .camera(name)
                .unwrap_or_else(|| Arc::new(CameraMetrics::new(name))),
            rtsp: self.feeds.get_mut(index).and_then(Option::take),
            live: self.views.get(index).cloned().flatten(),
            collect: self.slots.get(index).cloned().flatten(),
        }
    }

    /// Where the event store announces changed events.
    pub fn changes(&self) -> Changes {
        self.event_feed.clone()
    }

    /// Stops the servers (after the workers have finished).
    pub fn stop(self) {
        if let Some(train) = &self.train {
            train.stop();
        }
        if let Some(rtsp) = self.rtsp {
            rtsp.stop();
        }
        if let Some(http) = self.http {
            http.stop();
        }
    }
}
