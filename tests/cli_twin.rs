//! `edgetwin twin show/set` and `edgetwin provision` as users run them: the built binary
//! against an in-process emulator. Every run is checked for secrets on stdout/stderr.

mod cli_support;

use edgetwin_sim::testing as support;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::Duration;

use cli_support::{stderr, stdout};
use edgetwin::identity::{ModuleCredentials, ServiceCredentials};
use serde_json::{json, Value};
use support::{module_options, TestClient, TestSim};

const DEVICE: &str = "gw1";
const MODULE: &str = "edgetwin";
const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/#";

/// Runs the binary with `env` (and no inherited `EDGETWIN_*`), under a timeout.
async fn edgetwin(args: &[&str], env: &[(&str, &str)]) -> Output {
    cli_support::edgetwin_within(Duration::from_secs(60), args, env).await
}

/// No key, token or connection string in anything the command printed.
fn assert_no_secrets(out: &Output, secrets: &[&str]) {
    let text = format!("{}{}", stdout(out), stderr(out));
    for s in ["SharedAccessKey", "SharedAccessSignature", "sig="]
        .iter()
        .chain(secrets)
    {
        assert!(!text.contains(s), "printed a secret ({s}):\n{text}");
    }
}

/// A sim with `gw1/edgetwin` registered, and how to run `twin` against it.
struct Fixture {
    ts: TestSim,
    service: String,
    module_connstr: String,
}

impl Fixture {
    async fn start() -> Fixture {
        let ts = TestSim::start().await;
        let module_connstr = ts.register(DEVICE, MODULE);
        let service = ts
            .sim
            .service_connection_string("iothubowner")
            .expect("iothubowner policy");
        Fixture {
            ts,
            service,
            module_connstr,
        }
    }

    fn secrets(&self) -> Vec<String> {
        let service: ServiceCredentials = self.service.parse().unwrap();
        let module: ModuleCredentials = self.module_connstr.parse().unwrap();
        vec![
            service.key.as_base64().to_owned(),
            module.key.as_base64().to_owned(),
        ]
    }

    /// `edgetwin twin <sub> --device gw1 --module edgetwin --ca-file CA <extra...>` with the
    /// service connection string `policy`'s, from the environment.
    async fn twin_as(&self, policy: &str, sub: &str, extra: &[&str]) -> Output {
        let connstr = self.ts.sim.service_connection_string(policy).unwrap();
        let ca = self.ts.sim.ca_path();
        let mut args = vec![
            "twin",
            sub,
            "--device",
            DEVICE,
            "--module",
            MODULE,
            "--ca-file",
            ca.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = edgetwin(
            &args,
            &[("EDGETWIN_SERVICE_CONNECTION_STRING", connstr.as_str())],
        )
        .await;
        let secrets = self.secrets();
        assert_no_secrets(
            &out,
            &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        out
    }

    async fn twin(&self, sub: &str, extra: &[&str]) -> Output {
        self.twin_as("iothubowner", sub, extra).await
    }

    fn service_twin(&self) -> Value {
        self.ts
            .hub()
            .get_module_twin(DEVICE, MODULE)
            .expect("twin exists")
    }

    fn desired_version(&self) -> u64 {
        self.service_twin()["properties"]["desired"]["$version"]
            .as_u64()
            .unwrap()
    }
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_prints_the_twin_readably_and_as_json() {
    let f = Fixture::start().await;
    let set = f.twin("set", &["telemetryInterval=122"]).await;
    assert_eq!(code(&set), 0, "{}", stderr(&set));

    let out = f.twin("show", &[]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let twin = f.service_twin();
    let version = twin["properties"]["desired"]["$version"].as_u64().unwrap();
    assert!(text.contains("gw1/edgetwin"), "{text}");
    assert!(
        text.contains(&format!("desired ($version {version}):")),
        "{text}"
    );
    assert!(text.contains("telemetryInterval: 122"), "{text}");
    assert!(text.contains("reported ($version"), "{text}");
    assert!(
        text.contains(twin["etag"].as_str().unwrap()),
        "etag missing: {text}"
    );
    assert!(!text.contains("$metadata"), "{text}");

    let out = f.twin("show", &["--json"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let raw: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(raw["moduleId"], MODULE);
    assert_eq!(raw["etag"], twin["etag"]);
    assert_eq!(raw["properties"]["desired"]["telemetryInterval"], 122);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_of_an_unknown_module_exits_65() {
    let f = Fixture::start().await;
    let ca = f.ts.sim.ca_path();
    let out = edgetwin(
        &[
            "twin",
            "show",
            "--device",
            DEVICE,
            "--module",
            "nosuch",
            "--ca-file",
            ca.to_str().unwrap(),
        ],
        &[("EDGETWIN_SERVICE_CONNECTION_STRING", f.service.as_str())],
    )
    .await;
    assert_eq!(code(&out), 65, "{}", stderr(&out));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_bumps_the_desired_version_and_the_service_twin_has_it() {
    let f = Fixture::start().await;
    let before = f.desired_version();
    let out = f
        .twin(
            "set",
            &[
                "telemetryInterval=122",
                "site=north gate",
                "--patch",
                r#"{"limits": {"cpu": 80}}"#,
            ],
        )
        .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let after = f.desired_version();
    assert_eq!(after, before + 1);
    assert_eq!(stdout(&out).trim(), format!("desired $version {after}"));
    let desired = &f.service_twin()["properties"]["desired"];
    assert_eq!(desired["telemetryInterval"], json!(122));
    assert_eq!(desired["site"], json!("north gate"));
    assert_eq!(desired["limits"], json!({"cpu": 80}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_deletes_a_desired_property() {
    let f = Fixture::start().await;
    let out = f.twin("set", &["a=1", "b=2"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = f.twin("set", &["a=null"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let desired = f.service_twin()["properties"]["desired"].clone();
    assert!(desired.get("a").is_none(), "{desired}");
    assert_eq!(desired["b"], json!(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_assignment_exits_64_naming_it_and_changes_nothing() {
    let f = Fixture::start().await;
    let before = f.desired_version();
    let out = f
        .twin("set", &["telemetryInterval=5", "telemetryInterval"])
        .await;
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`telemetryInterval`"),
        "{}",
        stderr(&out)
    );
    let out = f.twin("set", &["=5"]).await;
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(stderr(&out).contains("`=5`"), "{}", stderr(&out));
    assert_eq!(f.desired_version(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_policy_exits_77() {
    let f = Fixture::start().await;
    let out = f.twin_as("registryRead", "set", &["x=1"]).await;
    assert_eq!(code(&out), 77, "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ack_without_an_ack_exits_69() {
    let f = Fixture::start().await;
    let out = f
        .twin("set", &["telemetryInterval=30", "--wait-ack", "1"])
        .await;
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    let version = f.desired_version();
    assert!(
        stdout(&out).contains(&format!("desired $version {version}")),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("telemetryInterval"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ack_succeeds_when_the_module_acknowledges() {
    let f = Fixture::start().await;
    let mut module = f.ts.connect(DEVICE, MODULE, true).await;
    module.subscribe(&[DESIRED]).await;

    let set = f.twin("set", &["telemetryInterval=122", "--wait-ack", "20"]);
    let ack = async {
        let patch = module.next_publish().await;
        let body: Value = serde_json::from_slice(&patch.payload).expect("JSON patch");
        assert_eq!(body["telemetryInterval"], 122);
        let version = body["$version"].as_u64().expect("patch $version");
        let reported = json!({"telemetryInterval":
            {"value": 122, "ac": 200, "av": version, "ad": "applied"}});
        module
            .publish(
                "$iothub/twin/PATCH/properties/reported/?$rid=1",
                reported.to_string(),
            )
            .await;
        version
    };
    let (out, version) = tokio::join!(set, ack);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("desired $version {version}")),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("acknowledged"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_twice_writes_the_same_credential_and_prints_no_key() {
    let ts = TestSim::start().await;
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let config = work.path().join("edgetwin.toml");
    let service_file = ts
        .sim
        .state_dir()
        .join(edgetwin_sim::server::SERVICE_CONNSTR_FILE);
    std::fs::write(
        &config,
        format!(
            "[hub]\nca_file = {ca:?}\n\n[provisioning]\nmethod = \"service\"\n\
             service_connection_string_file = {svc:?}\ndevice_id = \"{DEVICE}\"\n\
             module_id = \"{MODULE}\"\n\n[state]\ndir = {state:?}\n",
            ca = ts.sim.ca_path(),
            svc = service_file,
        ),
    )
    .unwrap();
    let service: ServiceCredentials = std::fs::read_to_string(&service_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let credential = state.join("module.connstr");

    let args = ["provision", "--config", config.to_str().unwrap()];
    let run = || edgetwin(&args, &[]);
    let first = run().await;
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    let written = std::fs::read_to_string(&credential).expect("module.connstr written");
    let module: ModuleCredentials = written.trim().parse().expect("a module connection string");
    let key = module.key.as_base64().to_owned();
    assert_no_secrets(&first, &[&key, service.key.as_base64()]);
    let text = stdout(&first);
    assert!(text.contains(DEVICE) && text.contains(MODULE), "{text}");
    assert!(text.contains(credential.to_str().unwrap()), "{text}");
    assert_eq!(
        std::fs::metadata(&credential).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(module.host_name, "localhost", "HostName without the port");
    assert_eq!(
        (module.device_id.as_str(), module.module_id.as_str()),
        (DEVICE, MODULE)
    );
    assert_eq!(
        ts.hub().module_connection_string(DEVICE, MODULE).as_deref(),
        Some(written.trim())
    );

    let second = run().await;
    assert_eq!(code(&second), 0, "{}", stderr(&second));
    assert_no_secrets(&second, &[&key, service.key.as_base64()]);
    assert_eq!(std::fs::read_to_string(&credential).unwrap(), written);

    // The credential works as written: the module connects with it.
    let (client, ack) = TestClient::connect(module_options(
        &ts.sim,
        written.trim(),
        true,
        support::unix_now() + 600,
    ))
    .await;
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_completes_an_interrupted_run() {
    let ts = TestSim::start().await;
    // A previous run created the device and stopped before the module.
    ts.hub()
        .put_device(DEVICE, &json!({}), None)
        .expect("device created");
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let config = work.path().join("edgetwin.toml");
    let svc = ts.sim.service_connection_string("iothubowner").unwrap();
    std::fs::write(
        &config,
        format!(
            "[hub]\nca_file = {ca:?}\n\n[provisioning]\nmethod = \"service\"\n\
             service_connection_string = \"{svc}\"\ndevice_id = \"{DEVICE}\"\n\
             module_id = \"{MODULE}\"\n\n[state]\ndir = {state:?}\n",
            ca = ts.sim.ca_path(),
        ),
    )
    .unwrap();
    let out = edgetwin(&["provision", "--config", config.to_str().unwrap()], &[]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("existing"), "{}", stdout(&out));
    let written = std::fs::read_to_string(state.join("module.connstr")).unwrap();
    assert_eq!(
        ts.hub().module_connection_string(DEVICE, MODULE).as_deref(),
        Some(written.trim())
    );
    let service: ServiceCredentials = svc.parse().unwrap();
    let module: ModuleCredentials = written.trim().parse().unwrap();
    assert_no_secrets(&out, &[module.key.as_base64(), service.key.as_base64()]);
}

/// `twin set` against a scripted hub whose twin changes (its etag moves on) after each
/// of the first `changes_after_get` GETs, for what the emulator cannot be made to do on
/// cue; returns the output and the `If-Match`es the PATCHes carried.
async fn set_against_fake(changes_after_get: u32) -> (Output, Vec<String>) {
    use support::scripted_https::{Reply, ScriptedHttps};

    let twin = |n: u64| {
        json!({"deviceId": "gw1", "moduleId": "edgetwin", "etag": format!("etag{n}"),
               "properties": {"desired": {"$version": n}, "reported": {"$version": 1}}})
    };
    let (mut etag, mut changes) = (4u64, changes_after_get);
    let hub = ScriptedHttps::start(move |req| match req.method.as_str() {
        "GET" => {
            let answer = Reply::json(200, twin(etag));
            if changes > 0 {
                changes -= 1;
                etag += 1;
            }
            answer
        }
        "PATCH" if req.header("if-match") == Some(&format!("\"etag{etag}\"")) => {
            etag += 1;
            Reply::json(200, twin(etag))
        }
        "PATCH" => Reply::hub_error(412, "PreconditionFailed", "etag mismatch"),
        _ => Reply::empty(405),
    })
    .await;
    let connstr = hub.service_connection_string("iothubowner");
    let ca = hub.ca_path();
    let out = edgetwin(
        &[
            "twin",
            "set",
            "--device",
            DEVICE,
            "--module",
            MODULE,
            "--ca-file",
            ca.to_str().unwrap(),
            "telemetryInterval=10",
        ],
        &[("EDGETWIN_SERVICE_CONNECTION_STRING", connstr.as_str())],
    )
    .await;
    let if_matches = hub
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.header("if-match").unwrap_or_default().to_owned())
        .collect();
    (out, if_matches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_retries_once_with_the_fresh_etag_after_412() {
    let (out, if_matches) = set_against_fake(1).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(if_matches, ["\"etag4\"", "\"etag5\""]);
    assert_eq!(stdout(&out).trim(), "desired $version 6");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_gives_up_after_a_second_412_with_exit_69() {
    let (out, if_matches) = set_against_fake(2).await;
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert_eq!(if_matches.len(), 2, "{if_matches:?}");
    assert!(stderr(&out).contains("precondition"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ack_reports_a_rejection_with_exit_65() {
    let f = Fixture::start().await;
    let mut module = f.ts.connect(DEVICE, MODULE, true).await;
    module.subscribe(&[DESIRED]).await;

    let set = f.twin("set", &["telemetryInterval=0", "--wait-ack", "20"]);
    let refuse = async {
        let patch = module.next_publish().await;
        let body: Value = serde_json::from_slice(&patch.payload).expect("JSON patch");
        let version = body["$version"].as_u64().expect("patch $version");
        let reported = json!({"telemetryInterval":
            {"value": 60, "ac": 400, "av": version, "ad": "below the minimum 1"}});
        module
            .publish(
                "$iothub/twin/PATCH/properties/reported/?$rid=1",
                reported.to_string(),
            )
            .await;
    };
    let (out, ()) = tokio::join!(set, refuse);
    assert_eq!(code(&out), 65, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("telemetryInterval: 400 below the minimum 1"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_takes_credential_and_ca_from_the_config() {
    let f = Fixture::start().await;
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("edgetwin.toml");
    let service_file =
        f.ts.sim
            .state_dir()
            .join(edgetwin_sim::server::SERVICE_CONNSTR_FILE);
    std::fs::write(
        &config,
        format!(
            "[hub]\nca_file = {ca:?}\n\n[provisioning]\nmethod = \"service\"\n\
             service_connection_string_file = {svc:?}\n\n[state]\ndir = {state:?}\n",
            ca = f.ts.sim.ca_path(),
            svc = service_file,
            state = work.path().join("state"),
        ),
    )
    .unwrap();
    let args = [
        "twin",
        "set",
        "--config",
        config.to_str().unwrap(),
        "--device",
        DEVICE,
        "--module",
        MODULE,
        "fromConfig=true",
    ];
    let out = edgetwin(&args, &[]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        f.service_twin()["properties"]["desired"]["fromConfig"],
        json!(true)
    );
    let secrets = f.secrets();
    assert_no_secrets(
        &out,
        &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_malformed_service_credential_exits_78() {
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("edgetwin.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\nconnection_string = \"HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey=AAAA\"\n\
             [state]\ndir = {:?}\n",
            work.path()
        ),
    )
    .unwrap();
    let base = ["twin", "show", "--device", DEVICE, "--module", MODULE];
    let mut args = base.to_vec();
    args.extend(["--config", config.to_str().unwrap()]);
    let out = edgetwin(&args, &[]).await;
    assert_eq!(code(&out), 78, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no service connection string"),
        "{}",
        stderr(&out)
    );

    let secret = "c2VjcmV0LWtleS1tYXRlcmlhbA==";
    let bad = format!("HostName=h;SharedAccessKeyName=p;SharedAccesKey={secret}");
    let out = edgetwin(
        &base,
        &[("EDGETWIN_SERVICE_CONNECTION_STRING", bad.as_str())],
    )
    .await;
    assert_eq!(code(&out), 78, "{}", stderr(&out));
    assert_no_secrets(&out, &[secret]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_hub_exits_69() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let connstr = format!(
        "HostName=localhost:{port};SharedAccessKeyName=iothubowner;SharedAccessKey={}",
        edgetwin::identity::SharedKey::generate().as_base64()
    );
    let out = edgetwin(
        &["twin", "show", "--device", DEVICE, "--module", MODULE],
        &[("EDGETWIN_SERVICE_CONNECTION_STRING", connstr.as_str())],
    )
    .await;
    assert_eq!(code(&out), 69, "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_against_an_unreachable_hub_exits_69_then_succeeds_once_it_is_up() {
    use edgetwin_sim::{Sim, SimConfig};

    // A fresh hub's state (policy key, CA), then its ports held by the test: the REST
    // port accepts and hangs up (counted), so the hub is unreachable.
    let sim_dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(SimConfig::ephemeral(sim_dir.path()))
        .await
        .expect("sim starts");
    let policy: ServiceCredentials = sim
        .service_connection_string("registryReadWrite")
        .unwrap()
        .parse()
        .unwrap();
    let ca = sim.ca_path();
    sim.shutdown().await;
    let mqtt_hold = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rest_hold = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (mqtt, https) = (
        mqtt_hold.local_addr().unwrap(),
        rest_hold.local_addr().unwrap(),
    );
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = attempts.clone();
    let unreachable = tokio::spawn(async move {
        let _mqtt_hold = mqtt_hold;
        while let Ok((tcp, _)) = rest_hold.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(tcp);
        }
    });

    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let config = work.path().join("edgetwin.toml");
    let svc = format!(
        "HostName=localhost:{};SharedAccessKeyName={};SharedAccessKey={}",
        https.port(),
        policy.policy_name,
        policy.key.as_base64()
    );
    std::fs::write(
        &config,
        format!(
            "[provisioning]\nmethod = \"service\"\nservice_connection_string = \"{svc}\"\n\
             device_id = \"{DEVICE}\"\nmodule_id = \"{MODULE}\"\n\n[state]\ndir = {state:?}\n"
        ),
    )
    .unwrap();
    // The CA from the command line, not the config.
    let args = [
        "provision",
        "--config",
        config.to_str().unwrap(),
        "--ca-file",
        ca.to_str().unwrap(),
    ];

    let out = edgetwin(&args, &[]).await;
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    let attempted = attempts.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (2..=4).contains(&attempted),
        "bounded retries: {attempted} attempts"
    );
    assert!(
        stderr(&out).contains("hub unavailable: PUT /devices/gw1"),
        "names what failed: {}",
        stderr(&out)
    );
    assert!(!state.join("module.connstr").exists());
    assert_no_secrets(&out, &[policy.key.as_base64()]);

    unreachable.abort();
    let _ = unreachable.await;
    let sim = Sim::start(SimConfig {
        mqtt_addr: mqtt,
        https_addr: https,
        hub_name: "localhost".into(),
        state_dir: sim_dir.path().to_owned(),
        ..SimConfig::ephemeral(sim_dir.path())
    })
    .await
    .expect("sim starts on the same ports");
    let out = edgetwin(&args, &[]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let written = std::fs::read_to_string(state.join("module.connstr")).unwrap();
    assert_eq!(
        sim.hub()
            .module_connection_string(DEVICE, MODULE)
            .as_deref(),
        Some(written.trim())
    );
    let module: ModuleCredentials = written.trim().parse().unwrap();
    assert_no_secrets(&out, &[policy.key.as_base64(), module.key.as_base64()]);
    sim.shutdown().await;
}
