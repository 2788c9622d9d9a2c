//! Specifications of configuration loading. Every test runs in a figment `Jail`, which
//! serialises tests that touch the process environment and restores it afterwards.

// `Jail` closures must return figment's own (large) error type; not ours to shrink.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};

use figment::Jail;

use super::*;
use crate::twin::TELEMETRY_INTERVAL;

pub(super) const SECRET_KEY: &str = "c2VjcmV0LWtleS1ub2JvZHktc2hvdWxkLXNlZQ==";

pub(super) fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A jail with the environment emptied, and a main file holding `body` after a minimal
/// valid base (module credentials file and a state dir inside the jail).
pub(super) fn setup(jail: &mut Jail, body: &str) -> (PathBuf, PathBuf) {
    jail.clear_env();
    let dir = jail.directory().to_path_buf();
    let main = dir.join("edgetwin.toml");
    let base = format!(
        "[state]\ndir = {:?}\n\n",
        dir.join("state").display().to_string()
    );
    write(&main, &(base + body));
    (dir, main)
}

pub(super) fn with_credentials(body: &str) -> String {
    format!("[hub]\nconnection_string_file = \"/run/module.connstr\"\n{body}")
}

pub(super) fn load_err(main: &Path) -> ConfigErrors {
    match Settings::load(Some(main)) {
        Ok(s) => panic!("expected errors, got {s:?}"),
        Err(e) => e,
    }
}

pub(super) fn keys(errors: &ConfigErrors) -> Vec<&str> {
    errors.iter().map(|e| e.key.as_str()).collect()
}

pub(super) fn find<'a>(errors: &'a ConfigErrors, key: &str) -> &'a ConfigError {
    errors
        .iter()
        .find(|e| e.key == key)
        .unwrap_or_else(|| panic!("no error for {key} in {errors}"))
}

#[test]
fn example_config_loads() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/edgetwin.toml");
        let s = Settings::load(Some(&example)).map_err(|e| e.to_string())?;
        assert_eq!(s.hub.sas_ttl, Duration::from_secs(3600));
        assert_eq!(s.hub.transport, HubTransport::Mqtt);
        assert_eq!(
            s.hub.credentials,
            CredentialSource::File("/etc/edgetwin/module.connstr".into())
        );
        assert_eq!(s.hub.backoff.max, Duration::from_secs(120));
        assert_eq!(s.provisioning.module_id, "edgetwin");
        assert_eq!(s.provisioning.method, ProvisioningMethod::None);
        assert_eq!(s.aziot, None);
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        assert_eq!(
            s.twin.schema.default_of(TELEMETRY_INTERVAL),
            Some(&serde_json::json!(60))
        );
        assert_eq!(s.state.dir, Path::new("/var/lib/edgetwin"));
        assert_eq!(s.files, [example]);
        Ok(())
    });
}

#[test]
fn unknown_key_is_named_with_its_file() {
    Jail::expect_with(|jail| {
        let (_, main) = setup(jail, &with_credentials("sas_tll = \"1h\"\n"));
        let errors = load_err(&main);
        let e = find(&errors, "hub.sas_tll");
        assert_eq!(e.message, "unknown key");
        assert_eq!(e.origin.as_deref(), Some(main.to_str().unwrap()));
        Ok(())
    });
}

#[test]
fn wrong_type_is_named_with_its_file() {
    Jail::expect_with(|jail| {
        let body = with_credentials("[telemetry]\nenabled = \"yes\"\n");
        let (_, main) = setup(jail, &body);
        let errors = load_err(&main);
        let e = find(&errors, "telemetry.enabled");
        assert!(e.message.contains("bool"), "{e}");
        assert_eq!(e.origin.as_deref(), Some(main.to_str().unwrap()));
        Ok(())
    });
}

#[test]
fn several_problems_are_reported_together() {
    Jail::expect_with(|jail| {
        let body = with_credentials(
            "transport = \"tcp\"\nsas_ttl = \"10s\"\nkeep_alive = \"soon\"\n\
             backoff = { initial = \"5m\", max = \"1m\" }\nbogus = 1\n\
             [twin]\nack = \"loud\"\n[twin.properties.fan]\ntype = \"colour\"\n\
             [twin.properties.level]\ntype = \"number\"\nmin = 5\nmax = 1\n\
             [log]\nlevel = \"very=loud=now\"\n",
        );
        let (dir, main) = setup(jail, &body);
        write(&dir.join("conf.d/10-x.toml"), "[telemetry]\nenabled = 3\n");
        let errors = load_err(&main);
        let mut found = keys(&errors);
        found.sort();
        assert_eq!(
            found,
            [
                "hub.backoff.initial",
                "hub.bogus",
                "hub.keep_alive",
                "hub.sas_ttl",
                "hub.transport",
                "log.level",
                "telemetry.enabled",
                "twin.ack",
                "twin.properties.fan.type",
                "twin.properties.level",
            ],
            "{errors}"
        );
        let drop_in = dir.join("conf.d/10-x.toml");
        assert_eq!(
            find(&errors, "telemetry.enabled").origin.as_deref(),
            Some(drop_in.to_str().unwrap())
        );
        Ok(())
    });
}

#[test]
fn property_without_type_is_reported_once() {
    Jail::expect_with(|jail| {
        let body = with_credentials("[twin.properties.fan]\nmin = 1\n");
        let (_, main) = setup(jail, &body);
        let errors = load_err(&main);
        assert_eq!(keys(&errors), ["twin.properties.fan.type"]);
        assert_eq!(
            errors.iter().next().unwrap().message,
            "required key is missing"
        );
        Ok(())
    });
}

#[test]
fn conf_d_overrides_in_name_order() {
    Jail::expect_with(|jail| {
        let (dir, main) = setup(jail, &with_credentials("[log]\nlevel = \"warn\"\n"));
        write(&dir.join("conf.d/20-b.toml"), "[log]\nlevel = \"trace\"\n");
        write(
            &dir.join("conf.d/10-a.toml"),
            "[log]\nlevel = \"debug\"\nformat = \"json\"\n",
        );
        write(
            &dir.join("conf.d/30-c.toml.disabled"),
            "[log]\nlevel = \"error\"\n",
        );
        let s = Settings::load(Some(&main)).map_err(|e| e.to_string())?;
        assert_eq!(s.log.level, "trace");
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(
            s.files,
            [
                main,
                dir.join("conf.d/10-a.toml"),
                dir.join("conf.d/20-b.toml")
            ]
        );
        Ok(())
    });
}

#[test]
fn env_overrides_files() {
    Jail::expect_with(|jail| {
        let (dir, main) = setup(jail, &with_credentials("[log]\nlevel = \"warn\"\n"));
        write(&dir.join("conf.d/10-a.toml"), "[log]\nlevel = \"trace\"\n");
        jail.set_env("EDGETWIN_LOG__LEVEL", "debug");
        jail.set_env("EDGETWIN_HUB__BACKOFF__MAX", "5m");
        // Not config: a CLI variable that shares the prefix.
        jail.set_env("EDGETWIN_SERVICE_CONNECTION_STRING", "HostName=x");
        let s = Settings::load(Some(&main)).map_err(|e| e.to_string())?;
        assert_eq!(s.log.level, "debug");
        assert_eq!(s.hub.backoff.max, Duration::from_secs(300));
        Ok(())
    });
}

#[test]
fn env_problem_names_the_variable() {
    Jail::expect_with(|jail| {
        let (_, main) = setup(jail, &with_credentials(""));
        jail.set_env("EDGETWIN_HUB__SAS_TTL", "soon");
        jail.set_env("EDGETWIN_LOG__COLOUR", "red");
        let errors = load_err(&main);
        assert_eq!(
            find(&errors, "hub.sas_ttl").origin.as_deref(),
            Some("environment variable EDGETWIN_HUB__SAS_TTL")
        );
        assert_eq!(
            find(&errors, "log.colour").origin.as_deref(),
            Some("environment variable EDGETWIN_LOG__COLOUR")
        );
        Ok(())
    });
}

#[test]
fn missing_credentials_is_an_error_when_provisioning_is_disabled() {
    Jail::expect_with(|jail| {
        let (_, main) = setup(jail, "");
        let errors = load_err(&main);
        assert_eq!(keys(&errors), ["hub.connection_string_file"]);
        assert!(errors.to_string().contains("no module credentials"));
        Ok(())
    });
}

#[test]
fn missing_credentials_are_fine_when_provisioning_will_create_them() {
    Jail::expect_with(|jail| {
        let body = "[provisioning]\nmethod = \"service\"\ndevice_id = \"gw1\"\n\
                    service_connection_string_file = \"/run/service.connstr\"\n";
        let (dir, main) = setup(jail, body);
        let s = Settings::load(Some(&main)).map_err(|e| e.to_string())?;
        let provisioned = dir.join("state/module.connstr");
        assert_eq!(
            s.hub.credentials,
            CredentialSource::Provisioned(provisioned.clone())
        );
        assert_eq!(s.module_credentials(), Ok(None));
        let text =
            format!("HostName=h;DeviceId=gw1;ModuleId=edgetwin;SharedAccessKey={SECRET_KEY}");
        write(&provisioned, &format!("{text}\n"));
        assert_eq!(s.module_credentials().unwrap(), Some(text));
        assert_eq!(s.module_identity().unwrap().unwrap().device_id, "gw1");
        Ok(())
    });
}

#[test]
fn provisioning_without_service_credentials_is_an_error() {
    Jail::expect_with(|jail| {
        let (_, main) = setup(jail, "[provisioning]\nmethod = \"service\"\n");
        let errors = load_err(&main);
        assert_eq!(
            keys(&errors),
            ["provisioning.service_connection_string_file"]
        );
        Ok(())
    });
}

#[test]
fn systemd_credential_is_used_when_no_file_is_configured() {
    Jail::expect_with(|jail| {
        let (dir, main) = setup(jail, "");
        let creds = dir.join("creds");
        let text = format!("HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey={SECRET_KEY}");
        write(
            &creds.join("module-connection-string"),
            &format!("{text}\n"),
        );
        jail.set_env("CREDENTIALS_DIRECTORY", creds.display());
        let s = Settings::load(Some(&main)).map_err(|e| e.to_string())?;
        assert!(matches!(
            s.hub.credentials,
            CredentialSource::SystemdCredential(_)
        ));
        assert_eq!(s.module_credentials().unwrap(), Some(text));
        Ok(())
    });
}

#[test]
fn unreadable_credentials_file_names_the_key() {
    Jail::expect_with(|jail| {
        let (dir, main) = setup(jail, &with_credentials(""));
        let s = Settings::load(Some(&main)).map_err(|e| e.to_string())?;
        let errors = s.module_credentials().unwrap_err();
        assert_eq!(keys(&errors), ["hub.connection_string_file"]);
        let _ = dir;
        Ok(())
    });
}

#[test]
fn inline_and_file_credentials_together_are_refused() {
    Jail::expect_with(|jail| {
        let body = with_credentials("connection_string = \"HostName=h\"\n");
        let (_, main) = setup(jail, &body);
        let errors = load_err(&main);
        assert_eq!(keys(&errors), ["hub.connection_string"]);
        Ok(())
    });
}

#[test]
fn explicit_config_path_must_exist() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let missing = jail.directory().join("nope.toml");
        let errors = load_err(&missing);
        assert!(
            errors.iter().any(|e| e.message == "no such file"),
            "{errors}"
        );
        Ok(())
    });
}

#[test]
fn unparsable_file_is_reported_and_the_rest_still_checked() {
    Jail::expect_with(|jail| {
        let (dir, main) = setup(jail, &with_credentials("sas_ttl = \"1s\"\n"));
        write(&dir.join("conf.d/50-broken.toml"), "[log\nlevel = ");
        let errors = load_err(&main);
        let broken = dir.join("conf.d/50-broken.toml");
        assert!(errors
            .iter()
            .any(|e| e.origin.as_deref() == Some(broken.to_str().unwrap())));
        find(&errors, "hub.sas_ttl");
        Ok(())
    });
}

#[test]
fn secrets_are_redacted_in_debug_and_check_config_output() {
    Jail::expect_with(|jail| {
        let body = format!(
            "[hub]\nconnection_string = \"HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey={SECRET_KEY}\"\n\
             proxy = \"http://user:hunter2@proxy:3128\"\n\
             [provisioning]\nservice_connection_string = \"HostName=h;SharedAccessKeyName=o;SharedAccessKey={SECRET_KEY}\"\n\
             [twin.properties.site]\ntype = \"object\"\ndefault = {{ name = \"north\", floor = 2 }}\n"
        );
        let (_, main) = setup(jail, &body);
        let s = Settings::load(Some(&main)).map_err(|e| e.to_string())?;
        let debug = format!("{s:?}");
        let toml = s.redacted_toml();
        for shown in [&debug, &toml] {
            assert!(!shown.contains(SECRET_KEY), "{shown}");
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("<redacted>"));
        }
        // What check-config prints is valid config again.
        use figment::providers::Format as _;
        let reparsed = figment::Figment::from(figment::providers::Toml::string(&toml))
            .extract::<raw::RawConfig>()
            .map_err(|e| e.to_string())?;
        assert_eq!(reparsed.hub.connection_string, "<redacted>");
        assert_eq!(
            reparsed.twin.properties["site"].default,
            Some(serde_json::json!({"name": "north", "floor": 2}))
        );
        Ok(())
    });
}

#[test]
fn refused_backoff_defaults_to_a_minute_up_to_an_hour_and_is_checked_like_backoff() {
    Jail::expect_with(|jail| {
        let (_, main) = setup(jail, &with_credentials(""));
        let s = Settings::load(Some(&main)).map_err(|e| e.to_string())?;
        assert_eq!(s.hub.refused_backoff.initial, Duration::from_secs(60));
        assert_eq!(s.hub.refused_backoff.max, Duration::from_secs(3600));
        assert!(s
            .redacted_toml()
            .contains("refused_backoff = { initial = \"1m\", max = \"1h\" }"));

        let body = with_credentials("refused_backoff = { initial = \"200ms\", max = \"1s\" }\n");
        let (_, main) = setup(jail, &body);
        let s = Settings::load(Some(&main)).map_err(|e| e.to_string())?;
        assert_eq!(s.hub.refused_backoff.initial, Duration::from_millis(200));

        let body = with_credentials("refused_backoff = { initial = \"2h\", max = \"soon\" }\n");
        let (_, main) = setup(jail, &body);
        let errors = load_err(&main);
        let mut found = keys(&errors);
        found.sort();
        assert_eq!(found, ["hub.refused_backoff.max"], "{errors}");
        let body = with_credentials("refused_backoff = { initial = \"2h\", max = \"1h\" }\n");
        let (_, main) = setup(jail, &body);
        let e = find(&load_err(&main), "hub.refused_backoff.initial")
            .message
            .clone();
        assert!(e.contains("longer than hub.refused_backoff.max"), "{e}");
        Ok(())
    });
}

#[test]
fn aziot_needs_no_credential_and_takes_the_identity_service_sockets() {
    Jail::expect_with(|jail| {
        let (_, main) = setup(jail, "[aziot]\nenabled = true\n");
        let s = Settings::load(Some(&main)).map_err(|e| e.to_string())?;
        let client = s.aziot.expect("aziot enabled");
        assert_eq!(
            client.identityd_socket(),
            Path::new(crate::aziot::IDENTITYD_SOCKET)
        );
        assert_eq!(client.keyd_socket(), Path::new(crate::aziot::KEYD_SOCKET));
        Ok(())
    });
}

#[test]
fn aziot_refuses_a_second_answer_to_who_the_module_is() {
    Jail::expect_with(|jail| {
        let body = with_credentials("\n[provisioning]\nmethod = \"dps\"\n\n[aziot]\nenabled = true\nkeyd_socket = \"keyd.sock\"\n");
        let (_, main) = setup(jail, &body);
        let errors = load_err(&main);
        let enabled: Vec<&str> = errors
            .iter()
            .filter(|e| e.key == "aziot.enabled")
            .map(|e| e.message.as_str())
            .collect();
        assert_eq!(enabled.len(), 2, "{errors}");
        assert!(
            enabled[0].contains("hub.connection_string_file"),
            "{errors}"
        );
        assert!(enabled[1].contains("provisioning.method"), "{errors}");
        assert_eq!(
            find(&errors, "aziot.keyd_socket").message,
            "must be an absolute path"
        );
        Ok(())
    });
}
