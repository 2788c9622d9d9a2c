//! Specifications of `[provisioning]`: the method and its deprecated predecessor, where
//! each method's secret comes from (files, inline, systemd credentials and the unit's
//! `absent` stand-in), the wrong kind of connection string, and a secret that may be gone
//! once the module credential exists.

// `Jail` closures must return figment's own (large) error type; not ours to shrink.
#![allow(clippy::result_large_err)]

use figment::Jail;

use super::tests::{find, keys, load_err, setup, write, SECRET_KEY};
use super::*;

fn load(main: &Path) -> Result<Settings, figment::Error> {
    Settings::load(Some(main)).map_err(|e| e.to_string().into())
}

fn device_string(device: &str) -> String {
    format!("HostName=hub.example:8443;DeviceId={device};SharedAccessKey={SECRET_KEY}")
}

fn warning_keys(s: &Settings) -> Vec<&str> {
    s.warnings.iter().map(|w| w.key.as_str()).collect()
}

#[test]
fn method_defaults_to_none_and_names_each_method() {
    Jail::expect_with(|jail| {
        let (dir, main) = setup(jail, "[hub]\nconnection_string_file = \"/run/m\"\n");
        let s = load(&main)?;
        assert_eq!(s.provisioning.method, ProvisioningMethod::None);
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        assert!(s.redacted_toml().contains("method = \"none\""));

        write(&dir.join("device.connstr"), &device_string("gw7"));
        let body = format!(
            "[provisioning]\nmethod = \"device\"\ndevice_connection_string_file = {:?}\n",
            dir.join("device.connstr").display().to_string()
        );
        let (_, main) = setup(jail, &body);
        let s = load(&main)?;
        assert_eq!(s.provisioning.method, ProvisioningMethod::Device);
        assert_eq!(s.provisioning.device_id, None, "taken from the credential");
        assert_eq!(s.device_identity().unwrap().unwrap().device_id, "gw7");
        s.check_credentials().map_err(|e| e.to_string())?;
        let toml = s.redacted_toml();
        assert!(toml.contains("method = \"device\""), "{toml}");
        assert!(toml.contains("device_connection_string_file = "), "{toml}");
        assert!(!toml.contains(SECRET_KEY), "{toml}");

        let (_, main) = setup(jail, "[provisioning]\nmethod = \"magic\"\n");
        let errors = load_err(&main);
        let e = find(&errors, "provisioning.method");
        assert!(e.message.contains("\"device\""), "{e}");
        Ok(())
    });
}

#[test]
fn enabled_true_still_means_service_with_a_warning_naming_method() {
    Jail::expect_with(|jail| {
        let body = "[provisioning]\nenabled = true\ndevice_id = \"gw1\"\n\
                    service_connection_string_file = \"/run/service.connstr\"\n";
        let (_, main) = setup(jail, body);
        let s = load(&main)?;
        assert_eq!(s.provisioning.method, ProvisioningMethod::Service);
        assert_eq!(warning_keys(&s), ["provisioning.enabled"]);
        let warning = s.warnings[0].to_string();
        assert!(
            warning.contains("provisioning.method = \"service\""),
            "{warning}"
        );
        assert!(
            warning.contains(main.to_str().unwrap()),
            "names the file: {warning}"
        );
        assert!(
            s.redacted_toml()
                .contains("# warning: provisioning.enabled"),
            "check-config shows it"
        );

        // The old default, `enabled = false`, beside a method: the method is in force.
        let body = "[provisioning]\nenabled = false\nmethod = \"service\"\ndevice_id = \"gw1\"\n\
                    service_connection_string_file = \"/run/service.connstr\"\n";
        let (_, main) = setup(jail, body);
        let s = load(&main)?;
        assert_eq!(s.provisioning.method, ProvisioningMethod::Service);
        assert_eq!(warning_keys(&s), ["provisioning.enabled"]);

        // `enabled = true` said "service"; another method contradicts it.
        let (_, main) = setup(
            jail,
            "[provisioning]\nenabled = true\nmethod = \"device\"\n",
        );
        let errors = load_err(&main);
        assert!(
            find(&errors, "provisioning.enabled")
                .message
                .contains("contradicts provisioning.method = \"device\""),
            "{errors}"
        );
        Ok(())
    });
}

#[test]
fn each_method_needs_its_secret_while_provisioning_is_due() {
    Jail::expect_with(|jail| {
        for (method, key) in [
            ("service", "provisioning.service_connection_string_file"),
            ("device", "provisioning.device_connection_string_file"),
            ("dps", "provisioning.dps.symmetric_key_file"),
        ] {
            let body = format!(
                "[provisioning]\nmethod = \"{method}\"\ndevice_id = \"gw1\"\n\
                 [provisioning.dps]\nid_scope = \"0ne00000001\"\n"
            );
            let (dir, main) = setup(jail, &body);
            let errors = load_err(&main);
            assert_eq!(keys(&errors), [key], "{method}: {errors}");
            assert!(errors.to_string().contains(method), "{errors}");

            // Provisioned: the secret is not needed; start, with a warning.
            write(
                &dir.join("state/module.connstr"),
                &format!("HostName=h;DeviceId=gw1;ModuleId=edgetwin;SharedAccessKey={SECRET_KEY}"),
            );
            let s = load(&main)?;
            assert_eq!(warning_keys(&s), [key], "{method}");
            assert!(
                s.warnings[0].message.contains("not needed"),
                "{}",
                s.warnings[0]
            );
            s.check_credentials().map_err(|e| e.to_string())?;
            std::fs::remove_file(dir.join("state/module.connstr")).unwrap();
        }
        Ok(())
    });
}

#[test]
fn a_secret_file_that_is_gone_after_provisioning_is_only_a_warning() {
    Jail::expect_with(|jail| {
        let body = "[provisioning]\nmethod = \"device\"\n\
                    device_connection_string_file = \"/nonexistent/device.connstr\"\n";
        let (dir, main) = setup(jail, body);
        let s = load(&main)?;
        assert!(s.warnings.is_empty(), "due: the read will say why");
        let errors = s.check_credentials().unwrap_err();
        assert_eq!(
            keys(&errors),
            ["provisioning.device_connection_string_file"]
        );

        write(
            &dir.join("state/module.connstr"),
            &format!("HostName=h;DeviceId=gw1;ModuleId=edgetwin;SharedAccessKey={SECRET_KEY}"),
        );
        let s = load(&main)?;
        assert_eq!(
            warning_keys(&s),
            ["provisioning.device_connection_string_file"]
        );
        assert!(s.warnings[0]
            .message
            .contains("/nonexistent/device.connstr"));
        s.check_credentials().map_err(|e| e.to_string())?;
        Ok(())
    });
}

#[test]
fn a_device_credential_of_the_wrong_kind_is_refused_naming_the_field() {
    Jail::expect_with(|jail| {
        let file = jail.directory().join("device.connstr");
        let body = format!(
            "[provisioning]\nmethod = \"device\"\ndevice_connection_string_file = {:?}\n",
            file.display().to_string()
        );
        let (_, main) = setup(jail, &body);
        let s = load(&main)?;
        for (kind, text) in [
            (
                "a module connection string",
                format!("HostName=h;DeviceId=gw1;ModuleId=m;SharedAccessKey={SECRET_KEY}"),
            ),
            (
                "a service connection string",
                format!("HostName=h;SharedAccessKeyName=p;SharedAccessKey={SECRET_KEY}"),
            ),
        ] {
            write(&file, &text);
            let errors = s.check_credentials().unwrap_err();
            let e = find(&errors, "provisioning.device_connection_string_file");
            assert!(e.message.contains(&format!("found {kind}")), "{e}");
            assert_eq!(e.origin.as_deref(), Some(file.to_str().unwrap()));
            assert!(!errors.to_string().contains(SECRET_KEY));
            assert_eq!(
                s.required_device_identity().unwrap_err(),
                errors,
                "run sees the same"
            );
        }

        // Inline, it is config text: refused at load.
        let body = format!(
            "[provisioning]\nmethod = \"device\"\ndevice_connection_string = \
             \"HostName=h;SharedAccessKeyName=p;SharedAccessKey={SECRET_KEY}\"\n"
        );
        let (_, main) = setup(jail, &body);
        let errors = load_err(&main);
        assert_eq!(keys(&errors), ["provisioning.device_connection_string"]);
        Ok(())
    });
}

#[test]
fn the_units_absent_stand_in_is_no_credential() {
    Jail::expect_with(|jail| {
        let (dir, main) = setup(jail, "[provisioning]\nmethod = \"device\"\n");
        let creds = dir.join("creds");
        for name in [
            credentials::SYSTEMD_MODULE_CREDENTIAL,
            credentials::SYSTEMD_DEVICE_CREDENTIAL,
            credentials::SYSTEMD_SERVICE_CREDENTIAL,
        ] {
            write(&creds.join(name), "absent\n");
        }
        jail.set_env("CREDENTIALS_DIRECTORY", creds.display());
        let errors = load_err(&main);
        assert_eq!(
            keys(&errors),
            ["provisioning.device_connection_string_file"],
            "neither module nor device credential was supplied: {errors}"
        );

        write(
            &creds.join(credentials::SYSTEMD_DEVICE_CREDENTIAL),
            &device_string("gw1"),
        );
        let s = load(&main)?;
        assert!(matches!(
            s.provisioning.device_credentials,
            Some(CredentialSource::SystemdCredential(_))
        ));
        assert!(matches!(
            s.hub.credentials,
            CredentialSource::Provisioned(_)
        ));
        assert_eq!(s.device_identity().unwrap().unwrap().device_id, "gw1");
        Ok(())
    });
}

#[test]
fn dps_settings_are_parsed_and_checked_when_dps_is_the_method() {
    Jail::expect_with(|jail| {
        let key = jail.directory().join("group.key");
        write(&key, &format!("{SECRET_KEY}\n"));
        let body = format!(
            "[provisioning]\nmethod = \"dps\"\n[provisioning.dps]\n\
             global_endpoint = \"localhost:8443\"\nid_scope = \"0ne0000A1B2\"\n\
             registration_id = \"gw-17\"\ngroup_key_file = {:?}\n",
            key.display().to_string()
        );
        let (_, main) = setup(jail, &body);
        let s = load(&main)?;
        let dps = &s.provisioning.dps;
        assert_eq!(dps.global_endpoint, "localhost:8443");
        assert_eq!(dps.id_scope, "0ne0000A1B2");
        assert_eq!(dps.registration_id, "gw-17");
        let (kind, decoded) = s.required_dps_key().map_err(|e| e.to_string())?;
        assert_eq!(kind, DpsKeyKind::Group);
        assert_eq!(decoded.as_base64(), SECRET_KEY);
        s.check_credentials().map_err(|e| e.to_string())?;
        let toml = s.redacted_toml();
        assert!(toml.contains("[provisioning.dps]"), "{toml}");
        assert!(toml.contains("group_key_file = "), "{toml}");

        let body = "[provisioning]\nmethod = \"dps\"\n[provisioning.dps]\n\
                    global_endpoint = \"https://dps\"\nsymmetric_key_file = \"/a\"\n\
                    group_key_file = \"/b\"\n";
        let (_, main) = setup(jail, body);
        let mut found = keys(&load_err(&main))
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        found.sort();
        assert_eq!(
            found,
            [
                "provisioning.dps.global_endpoint",
                "provisioning.dps.id_scope",
                "provisioning.dps.symmetric_key_file",
            ]
        );

        // Not the method: the defaults stand and nothing is required.
        let (_, main) = setup(jail, "[hub]\nconnection_string_file = \"/run/m\"\n");
        let s = load(&main)?;
        assert_eq!(s.provisioning.dps.global_endpoint, DPS_GLOBAL_ENDPOINT);
        assert_eq!(s.provisioning.dps.key, None);
        Ok(())
    });
}

#[test]
fn registry_endpoint_and_dps_ids_are_checked_as_the_clients_need_them() {
    Jail::expect_with(|jail| {
        let (_, main) = setup(
            jail,
            "[hub]\nconnection_string_file = \"/run/m\"\n\
             [provisioning]\nregistry_endpoint = \"localhost:8443\"\n",
        );
        let s = load(&main)?;
        let endpoint = s.provisioning.registry_endpoint.clone().expect("set");
        assert_eq!(endpoint.to_string(), "localhost:8443");
        assert!(s
            .redacted_toml()
            .contains("registry_endpoint = \"localhost:8443\""));
        let (_, main) = setup(jail, "[hub]\nconnection_string_file = \"/run/m\"\n");
        assert_eq!(load(&main)?.provisioning.registry_endpoint, None);

        let body = "[provisioning]\nmethod = \"dps\"\nregistry_endpoint = \"https://hub\"\n\
                    [provisioning.dps]\nid_scope = \"0ne-01\"\nregistration_id = \"gw 1\"\n\
                    group_key_file = \"/b\"\n";
        let (_, main) = setup(jail, body);
        let mut found = keys(&load_err(&main))
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        found.sort();
        assert_eq!(
            found,
            [
                "provisioning.dps.id_scope",
                "provisioning.dps.registration_id",
                "provisioning.registry_endpoint",
            ]
        );
        Ok(())
    });
}
