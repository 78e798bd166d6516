//! Alert snapshots: the annotated frame of an event that reached a new top score, as a JPEG on
//! `<prefix>/<camera>/snapshot` (through the MQTT publisher, not spooled).

use super::{Picture, Sink, SinkError};
use crate::alerts::{AlertEvent, PublishError, PublisherHandle};

/// JPEG quality of snapshots.
const QUALITY: u8 = 85;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot encode a {width}×{height} snapshot: {source}")]
    Jpeg {
        width: usize,
        height: usize,
        source: image::ImageError,
    },
    #[error("a {width}×{height} RGB snapshot cannot be {bytes} bytes")]
    Size {
        width: usize,
        height: usize,
        bytes: usize,
    },
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// One camera's snapshots.
pub struct Snapshots {
    camera: String,
    publisher: PublisherHandle,
}

impl Snapshots {
    pub fn new(camera: &str, publisher: PublisherHandle) -> Self {
        Self {
            camera: camera.to_string(),
            publisher,
        }
    }
}

impl Sink for Snapshots {
    fn alert(
        &mut self,
        event: &AlertEvent,
        picture: Option<&Picture<'_>>,
    ) -> Result<(), SinkError> {
        let (true, Some(picture)) = (event.snapshot, picture) else {
            return Ok(());
        };
        let bytes = jpeg(picture)?;
        self.publisher
            .snapshot(&self.camera, bytes)
            .map_err(|e| SinkError::Snapshot(e.into()))
    }
}

/// JPEG of an RGB picture.
pub fn jpeg(picture: &Picture<'_>) -> Result<Vec<u8>, SnapshotError> {
    let (width, height) = (picture.width, picture.height);
    let size = u32::try_from(width).ok().zip(u32::try_from(height).ok());
    let Some((w, h)) = size.filter(|_| picture.rgb.len() == width * height * 3) else {
        return Err(SnapshotError::Size {
            width,
            height,
            bytes: picture.rgb.len(),
        });
    };
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, QUALITY)
        .encode(picture.rgb, w, h, image::ExtendedColorType::Rgb8)
        .map_err(|source| SnapshotError::Jpeg {
            width,
            height,
            source,
        })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_are_jpeg_and_a_short_picture_is_an_error() {
        let rgb = vec![200u8; 16 * 8 * 3];
        let picture = Picture {
            rgb: &rgb,
            clean: &rgb,
            width: 16,
            height: 8,
            raw_score: 1.0,
        };
        let bytes = jpeg(&picture).expect("jpeg");
        assert_eq!(&bytes[..2], [0xFF, 0xD8]);
        let decoded = image::load_from_memory(&bytes).expect("decodes");
        assert_eq!((decoded.width(), decoded.height()), (16, 8));
        let short = Picture {
            rgb: &rgb[..10],
            ..picture
        };
        let message = jpeg(&short)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(message, "a 16×8 RGB snapshot cannot be 10 bytes");
    }
}
