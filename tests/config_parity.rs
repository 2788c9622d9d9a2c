//! `edgetwin check-config` accepts exactly what `edgetwin run` accepts: the same bad
//! configuration files are fed to both binaries' commands, and both must refuse them with
//! exit 78 and the same problem, naming the same key (first-boot provisioning secrets of
//! the wrong kind included, and `[aziot]` on a host without the Identity Service). Before validation produced the
//! session's own types, several of these passed `check-config` and failed only at `run`
//! (or, for a proxy port that was not a number, were accepted by both and then tunnelled
//! to the wrong place).

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

/// Longest a refused `run` may take; it refuses before any network I/O, but a run that
/// wrongly accepted its configuration would retry the hub forever.
const WAIT: Duration = Duration::from_secs(30);
const KEY: &str = "c2VjcmV0LWtleS1ub2JvZHktc2hvdWxkLXNlZQ==";

fn module_string() -> String {
    format!("HostName=127.0.0.1;DeviceId=gw1;ModuleId=edgetwin;SharedAccessKey={KEY}")
}

async fn edgetwin(command: &str, config: &Path) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgetwin"))
        .arg(command)
        .arg("--config")
        .arg(config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .env_remove("EDGETWIN_LOG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("edgetwin runs");
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`edgetwin {command}` did not exit: it accepted {config:?}"))
        .expect("output")
}

/// One bad configuration: the `[hub]` table, what follows it, and the files it names.
struct Case {
    what: &'static str,
    hub: String,
    rest: String,
    files: Vec<(&'static str, String)>,
    key: &'static str,
}

fn case(what: &'static str, key: &'static str, hub_extra: &str) -> Case {
    Case {
        what,
        hub: format!("connection_string = {:?}\n{hub_extra}", module_string()),
        rest: String::new(),
        files: Vec::new(),
        key,
    }
}

/// Writes the case into `dir`; `{dir}` in its text stands for `dir`.
fn write_case(dir: &Path, case: &Case) -> PathBuf {
    let dir_text = dir.display().to_string();
    for (name, content) in &case.files {
        std::fs::write(dir.join(name), content).expect("file written");
    }
    let text = format!(
        "[hub]\n{}\nbackoff = {{ initial = \"50ms\", max = \"300ms\" }}\n\n\
         [state]\ndir = \"{{dir}}/state\"\n\n{}\n",
        case.hub, case.rest
    )
    .replace("{dir}", &dir_text);
    let path = dir.join("edgetwin.toml");
    std::fs::write(&path, text).expect("config written");
    path
}

fn cases() -> Vec<Case> {
    let pem_garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let mut cases = vec![
        case(
            "proxy port that is not a number",
            "hub.proxy",
            "proxy = \"http://user:hunter2@proxy:notaport\"",
        ),
        case(
            "proxy that is not http://",
            "hub.proxy",
            "proxy = \"https://proxy:3128\"",
        ),
        case(
            "proxy URL with a path",
            "hub.proxy",
            "proxy = \"http://proxy:3128/squid\"",
        ),
        case(
            "CA file missing",
            "hub.ca_file",
            "ca_file = \"{dir}/none.pem\"",
        ),
        case(
            "CA file that holds no certificate",
            "hub.ca_file",
            "ca_file = \"{dir}/ca.pem\"",
        ),
        case(
            "CA file whose certificate is not DER",
            "hub.ca_file",
            "ca_file = \"{dir}/ca.pem\"",
        ),
        case(
            "gateway host with port 0",
            "hub.gateway_host",
            "gateway_host = \"gw:0\"",
        ),
        case(
            "gateway host written as a URL",
            "hub.gateway_host",
            "gateway_host = \"mqtts://gw\"",
        ),
        case("unknown transport", "hub.transport", "transport = \"tcp\""),
        case(
            "keep-alive out of range",
            "hub.keep_alive",
            "keep_alive = \"1s\"",
        ),
    ];
    cases[4]
        .files
        .push(("ca.pem", "not a certificate\n".into()));
    cases[5].files.push(("ca.pem", pem_garbage.into()));

    let mut bad_inline = case(
        "malformed inline connection string",
        "hub.connection_string",
        "",
    );
    bad_inline.hub =
        format!("connection_string = \"HostName=h;DeviceId=d;ModuleId=m;SharedAccesKey={KEY}\"");
    cases.push(bad_inline);

    let mut missing_file = case(
        "connection string file missing",
        "hub.connection_string_file",
        "",
    );
    missing_file.hub = "connection_string_file = \"{dir}/module.connstr\"".into();
    cases.push(missing_file);

    let mut bad_file = case(
        "malformed connection string file",
        "hub.connection_string_file",
        "",
    );
    bad_file.hub = "connection_string_file = \"{dir}/module.connstr\"".into();
    bad_file.files.push((
        "module.connstr",
        format!("HostName=h;DeviceId=d;SharedAccessKey={KEY}\n"),
    ));
    cases.push(bad_file);

    let mut bad_service = case(
        "first boot with a malformed service connection string file",
        "provisioning.service_connection_string_file",
        "",
    );
    bad_service.hub = String::new();
    bad_service.rest = "[provisioning]\nmethod = \"service\"\ndevice_id = \"gw1\"\n\
                        service_connection_string_file = \"{dir}/service.connstr\"\n"
        .into();
    bad_service.files.push((
        "service.connstr",
        format!("HostName=h;SharedAccessKey={KEY}\n"),
    ));
    cases.push(bad_service);

    let mut no_module_id = case(
        "first boot without a module id",
        "provisioning.module_id",
        "",
    );
    no_module_id.hub = String::new();
    no_module_id.rest = format!(
        "[provisioning]\nmethod = \"service\"\ndevice_id = \"gw1\"\nmodule_id = \"\"\n\
         service_connection_string = \"HostName=h;SharedAccessKeyName=p;SharedAccessKey={KEY}\"\n"
    );
    cases.push(no_module_id);

    for (what, wrong) in [
        (
            "first boot with a module connection string as the device credential",
            format!("HostName=h;DeviceId=gw1;ModuleId=edgetwin;SharedAccessKey={KEY}\n"),
        ),
        (
            "first boot with a service connection string as the device credential",
            format!("HostName=h;SharedAccessKeyName=registryReadWrite;SharedAccessKey={KEY}\n"),
        ),
    ] {
        let mut wrong_kind = case(what, "provisioning.device_connection_string_file", "");
        wrong_kind.hub = String::new();
        wrong_kind.rest = "[provisioning]\nmethod = \"device\"\n\
                           device_connection_string_file = \"{dir}/device.connstr\"\n"
            .into();
        wrong_kind.files.push(("device.connstr", wrong));
        cases.push(wrong_kind);
    }

    let mut no_device = case(
        "first boot with the device method and no device credential",
        "provisioning.device_connection_string_file",
        "",
    );
    no_device.hub = String::new();
    no_device.rest = "[provisioning]\nmethod = \"device\"\n".into();
    cases.push(no_device);

    let dps = "[provisioning]\nmethod = \"dps\"\n\n[provisioning.dps]\n\
               global_endpoint = \"localhost:8443\"\nregistration_id = \"gw1\"\n";
    for (what, key, extra, key_file) in [
        (
            "first boot with dps and no id scope",
            "provisioning.dps.id_scope",
            "group_key_file = \"{dir}/group.key\"\n",
            Some(KEY.to_string()),
        ),
        (
            "first boot with dps and an id scope DPS cannot have",
            "provisioning.dps.id_scope",
            "id_scope = \"0ne-0001\"\ngroup_key_file = \"{dir}/group.key\"\n",
            Some(KEY.to_string()),
        ),
        (
            "first boot with dps and no enrollment key",
            "provisioning.dps.symmetric_key_file",
            "id_scope = \"0ne00001\"\n",
            None,
        ),
        (
            "first boot with dps and a group key file that is no key",
            "provisioning.dps.group_key_file",
            "id_scope = \"0ne00001\"\ngroup_key_file = \"{dir}/group.key\"\n",
            Some("not base64!\n".to_string()),
        ),
    ] {
        let mut bad = case(what, key, "");
        bad.hub = String::new();
        bad.rest = format!("{dps}{extra}");
        if let Some(content) = key_file {
            bad.files.push(("group.key", content));
        }
        cases.push(bad);
    }
    let mut bad_registration = case(
        "first boot with dps and a registration id DPS cannot have",
        "provisioning.dps.registration_id",
        "",
    );
    bad_registration.hub = String::new();
    bad_registration.rest = "[provisioning]\nmethod = \"dps\"\n\n[provisioning.dps]\n\
                             id_scope = \"0ne00001\"\nregistration_id = \"gw 1/x\"\n\
                             group_key_file = \"{dir}/group.key\"\n"
        .into();
    bad_registration.files.push(("group.key", KEY.to_string()));
    cases.push(bad_registration);

    let mut bad_registry = case(
        "a registry endpoint written as a URL",
        "provisioning.registry_endpoint",
        "",
    );
    bad_registry.rest = "[provisioning]\nregistry_endpoint = \"https://localhost:8443\"\n".into();
    cases.push(bad_registry);

    let mut contradiction = case(
        "the deprecated enabled = true beside another method",
        "provisioning.enabled",
        "",
    );
    contradiction.rest = "[provisioning]\nenabled = true\nmethod = \"device\"\n".into();
    cases.push(contradiction);

    let mut aziot_and_string = case(
        "aziot beside a module connection string",
        "aziot.enabled",
        "",
    );
    aziot_and_string.rest = "[aziot]\nenabled = true\n".into();
    cases.push(aziot_and_string);

    let mut aziot_and_provisioning =
        case("aziot beside a provisioning method", "aziot.enabled", "");
    aziot_and_provisioning.hub = String::new();
    aziot_and_provisioning.rest = format!(
        "[provisioning]\nmethod = \"device\"\n\
         device_connection_string = \"HostName=h;DeviceId=gw1;SharedAccessKey={KEY}\"\n\n\
         [aziot]\nenabled = true\n"
    );
    cases.push(aziot_and_provisioning);

    let mut aziot_relative = case(
        "aziot with a relative socket path",
        "aziot.identityd_socket",
        "",
    );
    aziot_relative.hub = String::new();
    aziot_relative.rest =
        "[aziot]\nenabled = true\nidentityd_socket = \"run/aziot/identityd.sock\"\n".into();
    cases.push(aziot_relative);

    let mut aziot_missing = case(
        "aziot on a host without the Identity Service's sockets",
        "aziot.keyd_socket",
        "",
    );
    aziot_missing.hub = String::new();
    aziot_missing.rest = "[aziot]\nenabled = true\nidentityd_socket = \"{dir}/identityd.sock\"\n\
                          keyd_socket = \"{dir}/keyd.sock\"\n"
        .into();
    cases.push(aziot_missing);

    let mut bad_level = case("log level that is no filter", "log.level", "");
    bad_level.rest = "[log]\nlevel = \"very=loud=now\"\n".into();
    cases.push(bad_level);
    cases
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_and_run_refuse_the_same_configurations_naming_the_same_key() {
    for case in cases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_case(dir.path(), &case);
        let what = case.what;

        let check = edgetwin("check-config", &config).await;
        let check_err = stderr(&check);
        assert_eq!(
            check.status.code(),
            Some(78),
            "check-config, {what}: {check_err}"
        );
        assert!(
            check.stdout.is_empty(),
            "check-config, {what}: printed a config"
        );
        assert!(
            check_err.contains(case.key),
            "check-config, {what}: {check_err}"
        );

        let run = edgetwin("run", &config).await;
        let run_err = stderr(&run);
        assert_eq!(run.status.code(), Some(78), "run, {what}: {run_err}");
        assert!(run_err.contains(case.key), "run, {what}: {run_err}");
        // The very same problem, not merely the same key (check-config prints it after
        // "edgetwin: ", run logs it once after "edgetwin stopped: ").
        let problem = check_err.trim().trim_start_matches("edgetwin: ");
        assert!(
            run_err.contains(problem),
            "{what}: check-config said {check_err:?}, run said {run_err:?}"
        );
        for shown in [&check_err, &run_err] {
            assert!(!shown.contains(KEY), "{what}: key printed: {shown}");
            assert!(
                !shown.contains("hunter2"),
                "{what}: proxy password printed: {shown}"
            );
        }
    }
}

#[tokio::test]
async fn check_config_accepts_the_base_of_those_configurations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut good = case("good", "", "proxy = \"http://user:hunter2@proxy:3128\"");
    good.hub
        .push_str("\nca_file = \"{dir}/ca.pem\"\ngateway_host = \"[::1]\"");
    good.files.push(("ca.pem", TEST_CA.into()));
    let config = write_case(dir.path(), &good);
    let out = edgetwin("check-config", &config).await;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        printed.contains("gateway_host = \"[::1]:8883\""),
        "{printed}"
    );
    assert!(
        printed.contains("proxy = \"http://<redacted>@proxy:3128\""),
        "{printed}"
    );
    assert!(
        !printed.contains("hunter2") && !printed.contains(KEY),
        "{printed}"
    );
}

#[tokio::test]
async fn check_config_accepts_the_deprecated_enabled_and_shows_the_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut old = case("deprecated", "", "");
    old.hub = String::new();
    old.rest = format!(
        "[provisioning]\nenabled = true\ndevice_id = \"gw1\"\n\
         service_connection_string = \"HostName=h;SharedAccessKeyName=p;SharedAccessKey={KEY}\"\n"
    );
    let config = write_case(dir.path(), &old);
    let out = edgetwin("check-config", &config).await;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(printed.contains("method = \"service\""), "{printed}");
    assert!(
        printed.contains("# warning: provisioning.enabled: deprecated"),
        "{printed}"
    );
    assert!(!printed.contains(KEY), "{printed}");
}

#[tokio::test]
async fn check_config_accepts_aziot_with_its_sockets_and_shows_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _identityd =
        std::os::unix::net::UnixListener::bind(dir.path().join("identityd.sock")).expect("bound");
    let _keyd =
        std::os::unix::net::UnixListener::bind(dir.path().join("keyd.sock")).expect("bound");
    let mut aziot = case("aziot", "", "");
    aziot.hub = String::new();
    aziot.rest = "[aziot]\nenabled = true\nidentityd_socket = \"{dir}/identityd.sock\"\n\
                  keyd_socket = \"{dir}/keyd.sock\"\n"
        .into();
    let config = write_case(dir.path(), &aziot);
    let out = edgetwin("check-config", &config).await;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(printed.contains("[aziot]\nenabled = true\n"), "{printed}");
    let keyd = format!("keyd_socket = \"{}/keyd.sock\"", dir.path().display());
    assert!(printed.contains(&keyd), "{printed}");
}

/// A self-signed CA certificate (its key was thrown away).
const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBjTCCATOgAwIBAgIUet0o4gBXstjhaF2KJf7gLWc51RwwCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQZWRnZXR3aW4gdGVzdCBDQTAgFw0yNjExMjkyMzExMDhaGA8y
MTI2MTEwNTIzMTEwOFowGzEZMBcGA1UEAwwQZWRnZXR3aW4gdGVzdCBDQTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABECxbWfKams1hqQ02zAMunBNAe52hUk8WN6f
jgb/qYWmKS2uduSoBptoAjcHEKc1r8UrmNyA2xk3bJ1gc1LcZeKjUzBRMB0GA1Ud
DgQWBBQ5yed2Q34RM6qGvOA1wwnCdDr0SzAfBgNVHSMEGDAWgBQ5yed2Q34RM6qG
vOA1wwnCdDr0SzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIDuI
wN2f5358YYgDG2u6TJI8fOQ+/I5CGu29+d0xnaI+AiEA6oPvLYTp+GfNZnXkrwQI
gfKkGPv22heHiHIVDMec9I8=
-----END CERTIFICATE-----
";
