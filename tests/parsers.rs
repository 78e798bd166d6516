//! Property tests of what users and files feed stpm: pipeline files and `--set`, source URIs,
//! sizes, spool files, bundle manifests, password and token files and `Authorization` headers.
//! Whatever the input, each answers (a value or an error naming the problem) and never panics.

mod common;

use std::path::Path;

use proptest::prelude::*;
use stpm::alerts::Spool;
use stpm::bundle::Bundle;
use stpm::pipeline::auth::{Auth, AuthConfig};
use stpm::pipeline::config::{PipelineConfig, SourceUri};
use stpm::store::retention::parse_size;

/// Text that looks like a pipeline file: known sections and keys with odd values, or anything.
fn pipeline_text() -> impl Strategy<Value = String> {
    let section = prop::sample::select(vec![
        "[model]",
        "[[camera]]",
        "[camera.alerts]",
        "[camera.clips]",
        "[output]",
        "[output.record]",
        "[output.rtsp]",
        "[http]",
        "[http.auth]",
        "[mqtt]",
        "[alerts]",
        "[storage]",
        "[clips]",
    ]);
    let key = prop::sample::select(vec![
        "bundle",
        "name",
        "source",
        "max_fps",
        "stall_seconds",
        "enabled",
        "port",
        "bind",
        "path",
        "max_size",
        "keep_days",
        "pre_seconds",
        "max_seconds",
        "on_threshold",
        "k",
        "m",
        "sessions",
        "batch",
        "segment_seconds",
        "client_id",
        "password_file",
        "roi",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| format!("{x:e}")),
        "\"[ -~]{0,24}\"",
        Just("true".to_string()),
        Just("[[0.0, 0.0], [1.0, 0.5], [0.2, 1e300]]".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
    ];
    let line = prop_oneof![
        section.prop_map(String::from),
        (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        "[ -~]{0,40}",
    ];
    prop::collection::vec(line, 0..24).prop_map(|lines| lines.join("\n"))
}

fn load(dir: &Path, text: &str, sets: &[String]) {
    let path = dir.join("p.toml");
    std::fs::write(&path, text).expect("write");
    // Either a pipeline or an error; a panic fails the property.
    let _ = PipelineConfig::load(&path, sets);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn pipeline_files_and_sets_never_panic(text in pipeline_text(), set in "[a-z_.\\[\\]0-9]{1,24}=[ -~]{0,16}") {
        let dir = tempfile::tempdir().expect("dir");
        load(dir.path(), &text, &[]);
        load(dir.path(), "[model]\nbundle = \"b\"\n[[camera]]\nname = \"a\"\nsource = \"test://conveyor\"\n", &[set]);
    }

    #[test]
    fn source_uris_never_panic(
        uri in prop_oneof![
            "[ -~]{0,60}",
            "(rtsp|rtsps|file|v4l2|test)://[ -~]{0,40}",
            "test://conveyor\\?((frames|fps|seed)=[-+.e0-9a-z]{0,12}&?){0,4}",
        ]
    ) {
        let _ = SourceUri::parse(&uri);
    }

    #[test]
    fn sizes_never_panic_and_plain_numbers_are_bytes(text in "[ -~]{0,24}", n in any::<u32>()) {
        let _ = parse_size(&text);
        prop_assert_eq!(parse_size(&n.to_string()), Some(u64::from(n)));
    }

    #[test]
    fn spool_files_of_any_content_are_skipped_or_read(
        files in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..6)
    ) {
        let dir = tempfile::tempdir().expect("dir");
        for (index, bytes) in files.iter().enumerate() {
            std::fs::write(dir.path().join(format!("{:020}.msg", index + 1)), bytes).expect("write");
        }
        let spool = Spool::open(dir.path(), 100).expect("a spool of damaged files still opens");
        prop_assert_eq!(spool.len() + spool.warnings().len(), files.len());
    }

    #[test]
    fn manifests_of_any_content_are_refused_or_opened(
        text in prop_oneof![
            "[ -~\n]{0,200}",
            (any::<i64>(), any::<i64>()).prop_map(|(h, w)| format!(
                "format_version = 3\n[model]\ninput_size = [{h}, {w}]\n"
            )),
        ]
    ) {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("stpm.toml"), text).expect("write");
        let _ = Bundle::open(dir.path());
    }

    #[test]
    fn credential_files_and_headers_never_panic(
        passwords in "[ -~\n]{0,120}",
        tokens in "[ -~\n]{0,120}",
        header in prop_oneof![
            "[ -~]{0,60}",
            "(Basic|Bearer) [A-Za-z0-9+/=:]{0,40}",
        ]
    ) {
        let dir = tempfile::tempdir().expect("dir");
        let (password_file, token_file) = (dir.path().join("passwords"), dir.path().join("tokens"));
        std::fs::write(&password_file, passwords).expect("write");
        std::fs::write(&token_file, tokens).expect("write");
        let config = AuthConfig {
            password_file: Some(password_file),
            token_file: Some(token_file.clone()),
            metrics_token_file: Some(token_file),
        };
        if let Ok(Some(auth)) = Auth::load(&config, "0.0.0.0:9090") {
            let _ = auth.identify(Some(&header));
            let _ = auth.is_metrics_token(Some(&header));
        }
    }
}

/// A copy of the tiny test bundle's graph and manifest: the folder, its manifest's path and text.
fn copy_of_tiny_bundle() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().expect("dir");
    for file in ["model.onnx", "stpm.toml"] {
        std::fs::copy(
            common::tiny_conveyor_bundle().join(file),
            dir.path().join(file),
        )
        .expect("copy");
    }
    let manifest = dir.path().join("stpm.toml");
    let text = std::fs::read_to_string(&manifest).expect("read");
    (dir, manifest, text)
}

/// A real bundle whose manifest asks for an absurd input size is refused, naming the key, before
/// anything is allocated for it.
#[test]
fn a_manifest_asking_for_a_huge_input_is_refused() {
    let (dir, manifest, text) = copy_of_tiny_bundle();
    let mut table: toml::Table = toml::from_str(&text).expect("manifest TOML");
    table
        .get_mut("model")
        .and_then(|model| model.as_table_mut())
        .expect("[model]")
        .insert(
            "input_size".into(),
            toml::Value::try_from([100000, 100000]).expect("value"),
        );
    std::fs::write(&manifest, toml::to_string(&table).expect("TOML")).expect("write");
    let message = Bundle::open(dir.path())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        message.contains("input_size = [100000, 100000]") && message.contains("4096"),
        "{message}"
    );
    std::fs::write(&manifest, text).expect("write");
    Bundle::open(dir.path()).expect("the unchanged manifest opens");
}

/// Numbers that would turn every score into NaN (a camera that never alerts) and a version past
/// u32 are refused with the key named, not opened.
#[test]
fn a_manifest_whose_numbers_cannot_score_is_refused() {
    let (dir, manifest, text) = copy_of_tiny_bundle();
    let table: toml::Table = toml::from_str(&text).expect("manifest TOML");
    let edited = |section: &str, key: &str, value: toml::Value| {
        let mut table = table.clone();
        match table.get_mut(section).and_then(|s| s.as_table_mut()) {
            Some(section) => {
                section.insert(key.into(), value);
            }
            None => {
                table.insert(key.into(), value);
            }
        }
        toml::to_string(&table).expect("TOML")
    };
    for (section, key, value, named) in [
        (
            "calibration",
            "threshold",
            toml::Value::Float(f64::NAN),
            "threshold = NaN",
        ),
        (
            "calibration",
            "floor",
            toml::Value::Float(f64::INFINITY),
            "floor = inf",
        ),
        (
            "normalisation",
            "std",
            toml::Value::try_from([0.2, 0.0, 0.2]).expect("value"),
            "std = [0.2, 0.0, 0.2]",
        ),
        (
            "",
            "format_version",
            toml::Value::Integer(4_294_967_297),
            "format version 4294967297",
        ),
    ] {
        std::fs::write(&manifest, edited(section, key, value)).expect("write");
        let message = Bundle::open(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains(named), "{key}: {message}");
    }
    std::fs::write(&manifest, text).expect("write");
    Bundle::open(dir.path()).expect("the unchanged manifest opens");
}
