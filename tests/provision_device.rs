//! `edgetwin provision` with `[provisioning] method = "device"` as users run it (the built
//! binary against an in-process emulator whose device was created through the service
//! API): the module is created and keyed from the device key and its `generationId`,
//! re-runs change nothing, interrupted runs are completed, a re-created module gets new
//! keys; a wrong device key or another device's module exits 77 naming the device, a
//! connection string of the wrong kind exits 78 naming the field. On the wire (against a
//! scripted hub): a device-scoped token, `If-Match: *`, and a 429's `Retry-After` waited out.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use edgetwin::config::Settings;
use edgetwin::identity::{ModuleCredentials, SasToken, SharedKey};
use edgetwin::provision::{module_keys, Plan, ProvisionError};
use edgetwin_sim::testing::scripted_https::{Reply, ScriptedHttps};
use edgetwin_sim::testing::{module_options, unix_now, TestClient, TestSim};
use serde_json::json;

const DEVICE: &str = "gw1";
const MODULE: &str = "edgetwin";

/// Runs the binary (no inherited `EDGETWIN_*` or credentials), under a timeout.
async fn edgetwin(args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgetwin"));
    for (name, _) in std::env::vars() {
        if name.starts_with("EDGETWIN_") || name == "CREDENTIALS_DIRECTORY" {
            cmd.env_remove(name);
        }
    }
    cmd.args(args).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("edgetwin finished in time")
        .expect("edgetwin runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// No key, token or connection string in anything the command printed.
fn assert_no_secrets(out: &Output, secrets: &[&str]) {
    let (stdout, stderr) = text(out);
    let all = stdout + &stderr;
    for s in ["SharedAccessKey=", "SharedAccessSignature", "sig="]
        .iter()
        .chain(secrets)
    {
        assert!(!all.contains(s), "printed a secret ({s:.12}…):\n{all}");
    }
}

/// A gateway whose device identity exists in the hub and whose device connection string
/// (with the emulator's REST port) sits in a file the config names.
struct Gateway {
    ts: TestSim,
    work: tempfile::TempDir,
    device_key: SharedKey,
}

impl Gateway {
    async fn start() -> Gateway {
        let ts = TestSim::start().await;
        let device_key = create_device(&ts, DEVICE);
        let gw = Gateway {
            ts,
            work: tempfile::tempdir().unwrap(),
            device_key,
        };
        gw.write_device_file(&gw.device_connstr(DEVICE, &gw.device_key));
        gw.write_config("");
        gw
    }

    fn device_connstr(&self, device: &str, key: &SharedKey) -> String {
        format!(
            "HostName={};DeviceId={device};SharedAccessKey={}",
            self.ts.sim.rest_authority(),
            key.as_base64()
        )
    }

    fn device_file(&self) -> PathBuf {
        self.work.path().join("device.connstr")
    }

    fn write_device_file(&self, text: &str) {
        std::fs::write(self.device_file(), format!("{text}\n")).unwrap();
    }

    fn config(&self) -> PathBuf {
        self.work.path().join("edgetwin.toml")
    }

    /// `extra` goes into `[provisioning]`.
    fn write_config(&self, extra: &str) {
        let text = format!(
            "[hub]\nca_file = {ca:?}\n\n[provisioning]\nmethod = \"device\"\n\
             device_connection_string_file = {dev:?}\nmodule_id = \"{MODULE}\"\n{extra}\n\
             [state]\ndir = {state:?}\n",
            ca = self.ts.sim.ca_path(),
            dev = self.device_file(),
            state = self.work.path().join("state"),
        );
        std::fs::write(self.config(), text).unwrap();
    }

    fn credential(&self) -> PathBuf {
        self.work.path().join("state").join("module.connstr")
    }

    async fn provision(&self) -> Output {
        edgetwin(&["provision", "--config", self.config().to_str().unwrap()]).await
    }

    /// Runs `edgetwin provision`, which must succeed; returns stdout and the module key.
    async fn provisioned(&self) -> (String, SharedKey) {
        let out = self.provision().await;
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
        let written = std::fs::read_to_string(self.credential()).expect("module.connstr");
        let module: ModuleCredentials = written.trim().parse().expect("a module string");
        assert_no_secrets(&out, &[self.device_key.as_base64(), module.key.as_base64()]);
        (stdout, module.key)
    }

    /// The keys the module must have: derived from the device key and its generation.
    fn expected_key(&self) -> SharedKey {
        let module = self.ts.hub().get_module(DEVICE, MODULE).expect("module");
        let generation = module["generationId"].as_str().unwrap();
        module_keys(&self.device_key, MODULE, generation).0
    }

    async fn connects_with(&self, key: &SharedKey) -> bool {
        let connstr = format!(
            "HostName=localhost;DeviceId={DEVICE};ModuleId={MODULE};SharedAccessKey={}",
            key.as_base64()
        );
        let opts = module_options(&self.ts.sim, &connstr, true, unix_now() + 600);
        let (client, ack) = TestClient::try_connect(opts).await;
        let accepted = ack.is_ok();
        if accepted {
            client.disconnect().await;
        }
        accepted
    }
}

/// Creates `device` through the service API; returns its primary key.
fn create_device(ts: &TestSim, device: &str) -> SharedKey {
    let doc = ts
        .hub()
        .put_device(device, &json!({}), None)
        .expect("device created");
    SharedKey::from_base64(
        doc["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_with_a_device_key_creates_and_keys_the_module_and_a_rerun_changes_nothing() {
    let gw = Gateway::start().await;
    let (stdout, key) = gw.provisioned().await;
    assert!(
        stdout.contains("device: gw1 (its own credential)"),
        "{stdout}"
    );
    assert!(stdout.contains("module: edgetwin (created;"), "{stdout}");
    assert!(
        stdout.contains("derived from the device key and set"),
        "{stdout}"
    );
    assert_eq!(key, gw.expected_key());
    assert_eq!(
        std::fs::metadata(gw.credential())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let written = std::fs::read_to_string(gw.credential()).unwrap();
    assert!(written.starts_with("HostName=localhost;DeviceId=gw1;ModuleId=edgetwin;"));
    assert!(
        gw.connects_with(&key).await,
        "the written credential connects"
    );

    let etag = gw.ts.hub().get_module(DEVICE, MODULE).unwrap()["etag"].clone();
    let (stdout, again) = gw.provisioned().await;
    assert!(stdout.contains("module: edgetwin (existing;"), "{stdout}");
    assert!(stdout.contains("already set"), "{stdout}");
    assert_eq!(again, key);
    assert_eq!(std::fs::read_to_string(gw.credential()).unwrap(), written);
    assert_eq!(
        gw.ts.hub().get_module(DEVICE, MODULE).unwrap()["etag"],
        etag,
        "nothing was written to the hub"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_completes_a_run_interrupted_before_the_keys_or_before_the_file() {
    let gw = Gateway::start().await;
    // Interrupted after creating the module: it has the keys the hub generated.
    gw.ts
        .hub()
        .put_module(DEVICE, MODULE, &json!({}), None)
        .expect("module created");
    let (stdout, key) = gw.provisioned().await;
    assert!(stdout.contains("module: edgetwin (existing;"), "{stdout}");
    assert!(stdout.contains("and set"), "{stdout}");
    assert_eq!(key, gw.expected_key());

    // Interrupted after keying it, before the file was written.
    std::fs::remove_file(gw.credential()).unwrap();
    let (stdout, again) = gw.provisioned().await;
    assert!(stdout.contains("already set"), "{stdout}");
    assert_eq!(again, key);
    assert!(gw.connects_with(&key).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_created_module_gets_new_keys() {
    let gw = Gateway::start().await;
    let (_, old) = gw.provisioned().await;
    gw.ts
        .hub()
        .delete_module(DEVICE, MODULE, None)
        .expect("module deleted");
    gw.ts
        .hub()
        .put_module(DEVICE, MODULE, &json!({}), None)
        .expect("re-created");
    let (stdout, new) = gw.provisioned().await;
    assert!(stdout.contains("and set"), "{stdout}");
    assert_ne!(new, old, "a new generationId gives new keys");
    assert_eq!(new, gw.expected_key());
    assert!(gw.connects_with(&new).await);
    assert!(!gw.connects_with(&old).await, "the old keys are gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_device_key_exits_77_naming_the_device_never_the_key() {
    let gw = Gateway::start().await;
    let wrong = SharedKey::generate();
    gw.write_device_file(&gw.device_connstr(DEVICE, &wrong));
    let out = gw.provision().await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(77), "{stderr}");
    assert!(stderr.contains("device gw1"), "{stderr}");
    assert!(
        stderr.contains("keys rotated"),
        "says what to check: {stderr}"
    );
    assert!(!stderr.contains("registryReadWrite"), "{stderr}");
    assert_no_secrets(&out, &[wrong.as_base64(), gw.device_key.as_base64()]);
    assert!(!gw.credential().exists());
    assert!(
        gw.ts.hub().get_module(DEVICE, MODULE).is_err(),
        "nothing created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_key_cannot_provision_another_devices_module() {
    let gw = Gateway::start().await;
    create_device(&gw.ts, "gw2");
    gw.write_config("device_id = \"gw2\"\n");
    let out = gw.provision().await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(77), "{stderr}");
    assert!(stderr.contains("device gw2's"), "{stderr}");
    assert!(stderr.contains("device gw1"), "{stderr}");
    assert_no_secrets(&out, &[gw.device_key.as_base64()]);
    assert!(
        gw.ts.hub().get_module("gw2", MODULE).is_err(),
        "nothing created"
    );
    assert!(!gw.credential().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_string_of_the_wrong_kind_exits_78_naming_the_field() {
    let gw = Gateway::start().await;
    let key = SharedKey::generate();
    for wrong in [
        format!(
            "HostName=localhost;DeviceId=gw1;ModuleId=edgetwin;SharedAccessKey={}",
            key.as_base64()
        ),
        format!(
            "HostName=localhost;SharedAccessKeyName=registryReadWrite;SharedAccessKey={}",
            key.as_base64()
        ),
    ] {
        gw.write_device_file(&wrong);
        let out = gw.provision().await;
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(78), "{stderr}");
        assert!(
            stderr.contains("provisioning.device_connection_string_file"),
            "{stderr}"
        );
        assert!(
            stderr.contains("expected a device connection string"),
            "{stderr}"
        );
        assert_no_secrets(&out, &[key.as_base64()]);
    }
}

/// A plan against a scripted hub at `hub`, through the real config loader.
fn scripted_plan(hub: &ScriptedHttps, dir: &Path, device_key: &SharedKey) -> Plan {
    let device_file = dir.join("device.connstr");
    std::fs::write(
        &device_file,
        format!(
            "HostName={};DeviceId=gw1;SharedAccessKey={}",
            hub.authority(),
            device_key.as_base64()
        ),
    )
    .unwrap();
    let config = dir.join("edgetwin.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\nca_file = {ca:?}\n[provisioning]\nmethod = \"device\"\n\
             device_connection_string_file = {device_file:?}\n[state]\ndir = {state:?}\n",
            ca = hub.ca_path(),
            state = dir.join("state"),
        ),
    )
    .unwrap();
    let settings = Settings::load(Some(&config)).expect("config loads");
    Plan::from_settings(&settings, None).expect("a plan")
}

#[tokio::test]
async fn on_the_wire_a_device_token_and_if_match_star_and_retry_after_is_waited_out() {
    let generation = "636904759703045768";
    let mut gets = 0;
    let hub = ScriptedHttps::start(move |req| match (req.method.as_str(), req.header("if-match")) {
        ("GET", _) => {
            gets += 1;
            if gets == 1 {
                Reply::hub_error(429, "ThrottlingException", "slow down").header("retry-after", "1")
            } else {
                Reply::hub_error(404, "ModuleNotFound", "no module")
            }
        }
        ("PUT", None) => Reply::json(
            200,
            json!({"moduleId": "edgetwin", "deviceId": "gw1", "generationId": generation,
                   "authentication": {"symmetricKey": {"primaryKey": SharedKey::generate().as_base64(),
                   "secondaryKey": SharedKey::generate().as_base64()}, "type": "sas"}}),
        ),
        ("PUT", Some(_)) => {
            let mut doc = req.json();
            doc["generationId"] = json!(generation);
            Reply::json(200, doc)
        }
        _ => Reply::hub_error(405, "MethodNotAllowed", "no"),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let device_key = SharedKey::generate();
    let plan = scripted_plan(&hub, dir.path(), &device_key);

    let started = Instant::now();
    let done = plan.run().await.expect("provisioned");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was waited out"
    );
    assert!(done.module_created && done.keys_set);

    let requests = hub.requests();
    let lines: Vec<String> = requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        lines,
        [
            "GET /devices/gw1/modules/edgetwin",
            "GET /devices/gw1/modules/edgetwin",
            "PUT /devices/gw1/modules/edgetwin",
            "PUT /devices/gw1/modules/edgetwin",
        ]
    );
    for r in &requests {
        let token = SasToken::parse(r.header("authorization").unwrap()).expect("a SAS token");
        assert_eq!(
            token.resource, "localhost/devices/gw1",
            "device-scoped, no port"
        );
        assert_eq!(token.key_name, None, "no policy");
        assert_eq!(token.verify(&device_key, unix_now()), Ok(()));
    }
    assert_eq!(requests[2].header("if-match"), None, "create: no If-Match");
    assert_eq!(requests[3].header("if-match"), Some("*"));
    let (primary, secondary) = module_keys(&device_key, "edgetwin", generation);
    let keys = &requests[3].json()["authentication"];
    assert_eq!(
        keys["symmetricKey"]["primaryKey"],
        json!(primary.as_base64())
    );
    assert_eq!(
        keys["symmetricKey"]["secondaryKey"],
        json!(secondary.as_base64())
    );
    assert_eq!(keys["type"], "sas");
    let written = std::fs::read_to_string(&done.credential_file).unwrap();
    let module: ModuleCredentials = written.trim().parse().unwrap();
    assert_eq!(module.key, primary);
}

#[tokio::test]
async fn a_module_without_a_generation_id_is_refused_as_bad_data() {
    let hub = ScriptedHttps::replying(vec![Reply::json(
        200,
        json!({"moduleId": "edgetwin", "deviceId": "gw1"}),
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let plan = scripted_plan(&hub, dir.path(), &SharedKey::generate());
    let err = plan.run().await.unwrap_err();
    assert!(matches!(err, ProvisionError::NoGenerationId(_)), "{err:?}");
    assert_eq!(edgetwin::cli::provision_exit_code(&err), 65);
}

#[tokio::test]
async fn provision_shows_the_deprecation_warning_of_enabled() {
    let gw = Gateway::start().await;
    let config = gw.work.path().join("old.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\nca_file = {ca:?}\n[provisioning]\nenabled = true\ndevice_id = \"gw1\"\n\
             service_connection_string = \"{svc}\"\n[state]\ndir = {state:?}\n",
            ca = gw.ts.sim.ca_path(),
            svc = gw
                .ts
                .sim
                .service_connection_string("registryReadWrite")
                .unwrap(),
            state = gw.work.path().join("state"),
        ),
    )
    .unwrap();
    let out = edgetwin(&["provision", "--config", config.to_str().unwrap()]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stderr.contains("warning: provisioning.enabled: deprecated: write provisioning.method"),
        "{stderr}"
    );
    assert!(stdout.contains("device: gw1 (existing)"), "{stdout}");
}
