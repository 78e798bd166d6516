//! deploy/: the Grafana dashboard asks only for series a running `stpm run` exports, and the
//! pipeline files of the compose stack and the Kubernetes base are valid pipelines. (The image
//! itself is built and run by deploy/test-container.sh; the manifests are rendered and validated
//! by deploy/check.sh.)

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::broker::{Broker, free_port};
use common::{KillOnDrop, http_get, path_str, repo, spawn_run};

/// Every series name in a PromQL expression: identifiers starting with `stpm_` or `process_`.
fn series_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let word_end = rest[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .map_or(rest.len(), |e| start + e);
        let word = &rest[start..word_end];
        if word.starts_with("stpm_") || word.starts_with("process_") {
            names.push(word.to_owned());
        }
        rest = &rest[word_end..];
    }
    names
}

/// The `label="value"` matchers of an expression.
fn matchers_in(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (open, _) in expr.match_indices('{') {
        if let Some(close) = expr[open..].find('}') {
            found.extend(
                expr[open + 1..open + close]
                    .split(',')
                    .map(|m| m.trim().to_owned())
                    .filter(|m| m.contains("=\"")),
            );
        }
    }
    found
}

fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo("deploy/compose/grafana/dashboards/stpm.json"))
        .expect("read the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert_eq!(dashboard["uid"], "stpm");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "{} panels", panels.len());
    let mut exprs = Vec::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr").to_owned();
            assert!(
                !series_in(&expr).is_empty(),
                "panel {}: {expr} names no stpm series",
                panel["title"]
            );
            exprs.push(expr);
        }
    }
    exprs
}

#[test]
fn the_series_reader_finds_names_and_matchers() {
    let expr = "histogram_quantile(0.95, sum by (le) (rate(stpm_inference_seconds_bucket{camera=\"a\"}[5m]))) / process_x";
    assert_eq!(
        series_in(expr),
        ["stpm_inference_seconds_bucket", "process_x"]
    );
    assert_eq!(matchers_in(expr), ["camera=\"a\""]);
}

#[test]
fn every_dashboard_query_names_series_stpm_exports() {
    let exprs = dashboard_exprs();
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\n\n[[camera]]\nname = \"line1\"\n\
             source = \"test://conveyor?fps=15\"\n\n[http]\nenabled = true\nbind = \"127.0.0.1:{port}\"\n\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {}\n\n[alerts]\nspool_dir = \"spool\"\n",
            path_str(common::tiny_conveyor_bundle()),
            broker.port
        ),
    )
    .expect("write pipeline");
    let log = dir.path().join("run.log");
    let _run = KillOnDrop(spawn_run(&pipeline, &log, dir.path()));
    let deadline = Instant::now() + Duration::from_secs(120);
    let exposition = loop {
        if let Some((200, body)) = http_get(port, "/metrics")
            && body.contains("stpm_stage_recent_seconds{")
            && body.contains("stpm_mqtt_connected 1")
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no full /metrics within 120 s: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let exported: BTreeSet<&str> = exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for expr in &exprs {
        for name in series_in(expr) {
            assert!(
                exported.contains(name.as_str()),
                "the dashboard asks for {name} ({expr}); /metrics has {exported:?}"
            );
            for matcher in matchers_in(expr) {
                assert!(
                    exposition
                        .lines()
                        .any(|l| l.starts_with(&format!("{name}{{")) && l.contains(&matcher)),
                    "no {name} series with {matcher} ({expr})"
                );
            }
        }
    }
}

/// The pipeline files deploy/ ships are valid pipelines (every key known, every value in range).
#[test]
fn the_deploy_pipelines_are_valid() {
    for file in [
        "deploy/compose/pipeline.toml",
        "deploy/kubernetes/base/pipeline.toml",
    ] {
        let path = repo(file);
        let config = stpm::pipeline::config::PipelineConfig::load(&path, &[])
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(!config.camera.is_empty(), "{file}");
        assert!(config.http.enabled, "{file}: /health is the probe");
        assert!(config.http.auth.is_on(), "{file}: binds beyond loopback");
    }
    assert!(Path::new(&repo("deploy/Containerfile")).is_file());
}
