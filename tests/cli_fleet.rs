//! `edgetwin fleet` as users run it: the built binary against an in-process emulator.
//! A fleet of 50 daemons in-process (one emulator, 50 module identities): 30 tagged with
//! `twin set --tags`, a rollout applied to them and followed with `fleet status --wait`,
//! a second one the daemons' schema refuses; and the bad inputs with their exit codes.
//! Every run is checked for secrets on stdout/stderr.

mod cli_support;
mod daemon_support;

use std::process::Output;
use std::time::Duration;

use cli_support::{stderr, stdout};
use daemon_support::Daemon;
use edgetwin::config::Settings;
use edgetwin::fleet::FleetClient;
use edgetwin::identity::ServiceCredentials;
use edgetwin::registry::RegistryClient;
use edgetwin_sim::testing::register;
use edgetwin_sim::{Sim, SimConfig};
use serde_json::{json, Value};

const MODULE: &str = "edgetwin";

/// Runs the binary with `env` (and no inherited `EDGETWIN_*`), under a timeout.
async fn edgetwin(args: &[&str], env: &[(&str, &str)]) -> Output {
    cli_support::edgetwin_within(Duration::from_secs(240), args, env).await
}

/// A hub for the CLI: the emulator, and the service credential and CA to reach it.
struct Hub {
    sim: Sim,
    _dir: tempfile::TempDir,
    service: String,
    ca: String,
}

impl Hub {
    async fn start(configurations_every: Duration) -> Hub {
        let dir = tempfile::tempdir().expect("tempdir");
        let sim = Sim::start(SimConfig {
            configurations_every,
            ..SimConfig::ephemeral(dir.path())
        })
        .await
        .expect("sim starts");
        let service = sim
            .service_connection_string("iothubowner")
            .expect("iothubowner policy");
        let ca = sim.ca_path().display().to_string();
        Hub {
            sim,
            _dir: dir,
            service,
            ca,
        }
    }

    /// `edgetwin ARGS --ca-file CA` with the service connection string in the environment;
    /// fails the test if anything secret was printed.
    async fn run(&self, args: &[&str]) -> Output {
        let (head, tail) = args.split_at(2.min(args.len()));
        let mut all: Vec<&str> = head.to_vec();
        all.extend(["--ca-file", &self.ca]);
        all.extend(tail);
        let out = edgetwin(
            &all,
            &[("EDGETWIN_SERVICE_CONNECTION_STRING", &self.service)],
        )
        .await;
        let key: ServiceCredentials = self.service.parse().unwrap();
        let text = format!("{}{}", stdout(&out), stderr(&out));
        for secret in [
            "SharedAccessKey",
            "SharedAccessSignature",
            "sig=",
            key.key.as_base64(),
        ] {
            assert!(!text.contains(secret), "printed a secret:\n{text}");
        }
        out
    }

    fn configuration_ids(&self) -> Vec<String> {
        self.sim
            .hub()
            .list_configurations(None)
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    }

    fn twin(&self, device: &str) -> Value {
        self.sim
            .hub()
            .get_module_twin(device, MODULE)
            .expect("twin")
    }
}

#[track_caller]
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(out),
        stderr(out)
    );
}

/// Daemon settings for `device`'s module, through the real config loader.
fn daemon_settings(hub: &Hub, dir: &std::path::Path, device: &str) -> Settings {
    let connstr = hub
        .sim
        .hub()
        .module_connection_string(device, MODULE)
        .expect("registered");
    let path = dir.join("edgetwin.toml");
    let state = dir.join("state");
    let text = format!(
        "[hub]\nconnection_string = \"{connstr}\"\ngateway_host = \"127.0.0.1:{}\"\n\
         ca_file = \"{}\"\nbackoff = {{ initial = \"50ms\", max = \"300ms\" }}\n\n\
         [state]\ndir = \"{}\"\n",
        hub.sim.mqtt_addr().port(),
        hub.ca,
        state.display(),
    );
    std::fs::write(&path, text).expect("config written");
    Settings::load(Some(&path)).expect("valid config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_reaches_the_tagged_gateways_and_a_refused_one_names_who_and_why() {
    let hub = Hub::start(Duration::from_millis(500)).await;
    let dirs = tempfile::tempdir().expect("tempdir");
    let devices: Vec<String> = (1..=50).map(|i| format!("gw{i:02}")).collect();
    let mut daemons = Vec::new();
    for device in &devices {
        register(hub.sim.hub(), device, MODULE);
        let dir = dirs.path().join(device);
        std::fs::create_dir_all(&dir).unwrap();
        daemons.push(Daemon::start(daemon_settings(&hub, &dir, device)).await);
    }
    let (canary, others) = devices.split_at(30);
    for device in canary {
        let out = hub
            .run(&[
                "twin",
                "set",
                "--device",
                device,
                "--module",
                MODULE,
                "--tags",
                r#"{"fleet": "canary"}"#,
            ])
            .await;
        assert_exit(&out, 0);
    }

    let out = hub
        .run(&[
            "fleet",
            "apply",
            "interval-30",
            "--target",
            "tags.fleet = 'canary'",
            "telemetryInterval=30",
        ])
        .await;
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("(priority 10)"), "{}", stdout(&out));

    let out = hub
        .run(&["fleet", "status", "interval-30", "--wait", "180"])
        .await;
    assert_exit(&out, 0);
    assert!(
        stdout(&out)
            .contains("interval-30 (priority 10): 30 targeted, 30 applied, 0 rejected, 0 pending"),
        "{}",
        stdout(&out)
    );
    for device in canary {
        let twin = hub.twin(device);
        assert_eq!(
            twin["properties"]["reported"]["telemetryInterval"]["value"],
            30
        );
        assert_eq!(
            twin["properties"]["reported"]["telemetryInterval"]["ac"],
            200
        );
    }
    for device in others {
        let twin = hub.twin(device);
        assert_eq!(
            twin["properties"]["desired"].get("telemetryInterval"),
            None,
            "{twin}"
        );
        assert_ne!(
            twin["properties"]["reported"]["telemetryInterval"]["value"],
            30
        );
        assert_eq!(twin.pointer("/configurations/interval-30"), None, "{twin}");
    }
    let out = hub
        .run(&[
            "fleet", "query", "--json",
            "SELECT deviceId FROM devices.modules WHERE properties.reported.telemetryInterval.value = 30",
        ])
        .await;
    assert_exit(&out, 0);
    let rows: Vec<Value> = serde_json::from_str(&stdout(&out)).expect("JSON rows");
    let mut got: Vec<&str> = rows
        .iter()
        .map(|r| r["deviceId"].as_str().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, canary.iter().map(String::as_str).collect::<Vec<_>>());

    // A value the schema refuses: a new configuration (content is immutable), which takes
    // the next priority by itself.
    let out = hub
        .run(&[
            "fleet",
            "apply",
            "interval-0",
            "--target",
            "tags.fleet = 'canary'",
            "telemetryInterval=0",
        ])
        .await;
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("(priority 11)"), "{}", stdout(&out));
    let out = hub
        .run(&["fleet", "status", "interval-0", "--wait", "180", "--json"])
        .await;
    assert_exit(&out, 65);
    let statuses: Value = serde_json::from_str(&stdout(&out)).expect("JSON statuses");
    let status = &statuses[0];
    assert_eq!(
        (
            &status["targeted"],
            &status["applied"],
            &status["rejected"],
            &status["pending"]
        ),
        (&json!(30), &json!(0), &json!(30), &json!(0)),
        "{status}"
    );
    let rejections = status["rejections"].as_array().unwrap();
    let mut who: Vec<&str> = rejections
        .iter()
        .map(|r| r["deviceId"].as_str().unwrap())
        .collect();
    who.sort_unstable();
    assert_eq!(who, canary.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        rejections[0]["reasons"][0],
        json!({"setting": "telemetryInterval", "ac": 400, "ad": "0 is below the minimum 1"})
    );
    assert!(
        stderr(&out).contains("30 gateway(s) rejected"),
        "{}",
        stderr(&out)
    );
    // Every rollout at once: the first is superseded where the second wins, so nothing is
    // pending, and the refusals make it 65.
    let out = hub.run(&["fleet", "status"]).await;
    assert_exit(&out, 65);
    assert!(
        stdout(&out).contains(
            "interval-30 (priority 10): 30 targeted, 0 applied, 0 rejected, 0 pending, 30 superseded"
        ),
        "{}",
        stdout(&out)
    );
    // The refused value never reached the gateways: 30 stays in force.
    let twin = hub.twin(&canary[0]);
    assert_eq!(
        twin["properties"]["reported"]["telemetryInterval"]["value"],
        30
    );

    for daemon in daemons {
        daemon.stop().await.expect("clean stop");
    }
}

#[tokio::test]
async fn apply_refuses_bad_assignments_with_64_before_asking_the_hub() {
    let hub = Hub::start(Duration::from_secs(5)).await;
    for args in [
        &["fleet", "apply", "a", "--target", "true", "noequals"][..],
        &["fleet", "apply", "a", "--target", "true", "=5"],
        &["fleet", "apply", "a", "--target", "true", "gone=null"],
        &["fleet", "apply", "a", "--target", "true"],
        &["fleet", "apply", "Upper", "--target", "true", "t=1"],
        &["fleet", "apply", "a", "--target", " ", "t=1"],
    ] {
        let out = hub.run(args).await;
        assert_exit(&out, 64);
        assert!(!stderr(&out).is_empty());
    }
    assert!(hub.configuration_ids().is_empty());
    let out = hub
        .run(&[
            "twin", "set", "--device", "d", "--module", "m", "--tags", "[1]",
        ])
        .await;
    assert_exit(&out, 64);
    assert!(
        stderr(&out).contains("--tags must be a JSON object"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_target_the_hub_rejects_is_65_with_its_message_and_nothing_is_created() {
    let hub = Hub::start(Duration::from_secs(5)).await;
    let out = hub
        .run(&[
            "fleet",
            "apply",
            "broken",
            "--target",
            "tags.site = ",
            "t=1",
        ])
        .await;
    assert_exit(&out, 65);
    let err = stderr(&out);
    assert!(err.contains("InvalidConfigurationTargetCondition"), "{err}");
    assert!(err.contains("nothing was created"), "{err}");
    assert!(hub.configuration_ids().is_empty());

    let out = hub
        .run(&["fleet", "query", "SELEKT * FROM devices.modules"])
        .await;
    assert_exit(&out, 65);
    assert!(stderr(&out).contains("syntax error"), "{}", stderr(&out));
}

#[tokio::test]
async fn an_existing_name_is_65_and_points_to_a_new_configuration_with_a_higher_priority() {
    let hub = Hub::start(Duration::from_secs(5)).await;
    let apply = [
        "fleet",
        "apply",
        "site-a",
        "--target",
        "tags.site = 'a'",
        "--priority",
        "40",
        "t=1",
    ];
    assert_exit(&hub.run(&apply).await, 0);
    let out = hub.run(&apply).await;
    assert_exit(&out, 65);
    let err = stderr(&out);
    assert!(
        err.contains("`site-a` already exists (priority 40)"),
        "{err}"
    );
    assert!(err.contains("--priority 41"), "{err}");
    assert_eq!(hub.configuration_ids(), ["site-a"]);
}

#[tokio::test]
async fn the_hubs_limit_of_100_configurations_is_reported_clearly() {
    let hub = Hub::start(Duration::from_secs(5)).await;
    for i in 0..100 {
        let id = format!("c{i:03}");
        let body = json!({"id": id, "content": {"moduleContent": {"properties.desired.x": i}},
            "targetCondition": "FROM devices.modules WHERE tags.none = 1", "priority": 1});
        hub.sim
            .hub()
            .put_configuration(&id, &body, None)
            .expect("created");
    }
    let out = hub
        .run(&[
            "fleet",
            "apply",
            "one-more",
            "--target",
            "tags.x = 1",
            "t=1",
        ])
        .await;
    assert_exit(&out, 65);
    let err = stderr(&out);
    assert!(err.contains("ConfigurationCountLimitExceeded"), "{err}");
    assert!(err.contains("IoT Hub allows 100 per hub"), "{err}");
    assert!(!hub.configuration_ids().contains(&"one-more".to_owned()));
}

#[tokio::test]
async fn list_remove_and_status_of_an_unknown_rollout() {
    let hub = Hub::start(Duration::from_secs(5)).await;
    register(hub.sim.hub(), "gw1", MODULE);
    let out = hub
        .run(&[
            "fleet",
            "apply",
            "r1",
            "--target",
            "deviceId = 'gw1'",
            "t=5",
        ])
        .await;
    assert_exit(&out, 0);
    let out = hub.run(&["fleet", "list"]).await;
    assert_exit(&out, 0);
    assert!(
        stdout(&out).lines().any(|l| l.starts_with("r1 ")),
        "{}",
        stdout(&out)
    );
    // Nobody acknowledges (no daemon runs): pending, and a snapshot says so with 69.
    let out = hub.run(&["fleet", "status", "r1"]).await;
    assert_exit(&out, 69);
    assert!(
        stdout(&out).contains("1 targeted, 0 applied, 0 rejected, 1 pending"),
        "{}",
        stdout(&out)
    );

    assert_exit(&hub.run(&["fleet", "remove", "r1"]).await, 0);
    assert!(hub.configuration_ids().is_empty());
    for args in [&["fleet", "remove", "r1"][..], &["fleet", "status", "r1"]] {
        let out = hub.run(args).await;
        assert_exit(&out, 65);
        assert!(
            stderr(&out).contains("no configuration `r1`"),
            "{}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn a_query_follows_every_continuation_page() {
    let hub = Hub::start(Duration::from_secs(5)).await;
    for i in 1..=5 {
        register(hub.sim.hub(), &format!("gw{i}"), MODULE);
    }
    let registry =
        RegistryClient::from_connection_string(&hub.service, Some(hub.sim.ca_path().as_path()))
            .expect("client");
    let client = FleetClient::new(registry).with_page_size(2);
    let rows = client
        .query("SELECT deviceId FROM devices.modules")
        .await
        .expect("query");
    let mut got: Vec<&str> = rows
        .iter()
        .map(|r| r["deviceId"].as_str().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, ["gw1", "gw2", "gw3", "gw4", "gw5"]);
    assert_eq!(client.take_usage().queries, 3, "pages of 2, 2 and 1");
}
