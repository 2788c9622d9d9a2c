//! Specifications of the rule that `load` (and so `check-config`) refuses what `run`
//! would refuse: every hub value is parsed into the type the session uses, the CA file
//! and inline connection strings are read at load, credential files by
//! `check_credentials`; and settings compare by value, secrets included, for reloads.

// `Jail` closures must return figment's own (large) error type; not ours to shrink.
#![allow(clippy::result_large_err)]

use figment::Jail;

use super::tests::{find, keys, load_err, setup, with_credentials, write, SECRET_KEY};
use super::*;
use crate::hub::tls::TEST_CA_PEM;

fn module_string(key: &str) -> String {
    format!("HostName=h.example;DeviceId=gw1;ModuleId=edgetwin;SharedAccessKey={key}")
}

fn load(main: &Path) -> Result<Settings, figment::Error> {
    Settings::load(Some(main)).map_err(|e| e.to_string().into())
}

#[test]
fn gateway_host_gets_the_port_of_its_transport_when_it_names_none() {
    Jail::expect_with(|jail| {
        let (_, main) = setup(jail, &with_credentials("gateway_host = \"gw.local\"\n"));
        let s = load(&main)?;
        let expected = HostPort {
            host: "gw.local".into(),
            port: 8883,
        };
        assert_eq!(s.hub.gateway_host, Some(expected));
        assert!(s
            .redacted_toml()
            .contains("gateway_host = \"gw.local:8883\""));

        let body = "gateway_host = \"gw.local\"\ntransport = \"mqtt-ws\"\n";
        let (_, main) = setup(jail, &with_credentials(body));
        assert_eq!(load(&main)?.hub.gateway_host.map(|g| g.port), Some(443));

        let (_, main) = setup(jail, &with_credentials("gateway_host = \"[::1]:1884\"\n"));
        let expected = HostPort {
            host: "::1".into(),
            port: 1884,
        };
        assert_eq!(load(&main)?.hub.gateway_host, Some(expected));
        Ok(())
    });
}

#[test]
fn a_gateway_host_the_session_could_not_use_is_refused_at_load() {
    Jail::expect_with(|jail| {
        for bad in ["http://gw", "gw:0", "gw:99999", "::1", "gw:1:2"] {
            let body = with_credentials(&format!("gateway_host = {bad:?}\n"));
            let (_, main) = setup(jail, &body);
            let errors = load_err(&main);
            assert_eq!(keys(&errors), ["hub.gateway_host"], "{bad}");
            let e = find(&errors, "hub.gateway_host");
            assert_eq!(e.origin.as_deref(), Some(main.to_str().unwrap()));
        }
        Ok(())
    });
}

#[test]
fn proxy_is_parsed_at_load_into_what_the_session_uses() {
    Jail::expect_with(|jail| {
        let body = with_credentials("proxy = \"http://user:hunter2@proxy.lan:3128/\"\n");
        let (_, main) = setup(jail, &body);
        let s = load(&main)?;
        let expected = HttpProxy {
            address: HostPort {
                host: "proxy.lan".into(),
                port: 3128,
            },
            basic_auth: Some(("user".into(), "hunter2".into())),
        };
        assert_eq!(s.hub.proxy, Some(expected));
        let toml = s.redacted_toml();
        assert!(
            toml.contains("proxy = \"http://<redacted>@proxy.lan:3128\""),
            "{toml}"
        );
        assert!(!toml.contains("hunter2") && !format!("{s:?}").contains("hunter2"));
        Ok(())
    });
}

#[test]
fn a_proxy_url_the_session_could_not_use_is_refused_at_load_without_its_password() {
    Jail::expect_with(|jail| {
        for bad in [
            "http://user:hunter2@proxy:notaport",
            "https://user:hunter2@proxy:3128",
            "http://user:hunter2@proxy:3128/squid",
            "http://user:hunter2@",
            "proxy:3128",
        ] {
            let (_, main) = setup(jail, &with_credentials(&format!("proxy = {bad:?}\n")));
            let errors = load_err(&main);
            assert_eq!(keys(&errors), ["hub.proxy"], "{bad}");
            assert!(!errors.to_string().contains("hunter2"), "{errors}");
        }
        Ok(())
    });
}

#[test]
fn ca_file_is_read_and_checked_at_load() {
    Jail::expect_with(|jail| {
        let ca = jail.directory().join("ca.pem");
        let body = format!("ca_file = {:?}\n", ca.display().to_string());
        let (_, main_abs) = setup(jail, &with_credentials(&body));

        let e = load_err(&main_abs);
        assert_eq!(keys(&e), ["hub.ca_file"]);
        assert!(
            find(&e, "hub.ca_file").message.contains("cannot read"),
            "{e}"
        );

        for (garbage, says) in [
            ("not a certificate\n", "no PEM certificate"),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "not usable",
            ),
        ] {
            write(&ca, garbage);
            let e = load_err(&main_abs);
            assert_eq!(keys(&e), ["hub.ca_file"]);
            assert!(find(&e, "hub.ca_file").message.contains(says), "{e}");
        }

        write(&ca, TEST_CA_PEM);
        let s = load(&main_abs)?;
        let bundle = s.hub.ca_file.as_ref().expect("a CA bundle");
        assert_eq!(bundle.path(), ca);
        assert_eq!(bundle.certificates().len(), 1);
        assert!(s
            .redacted_toml()
            .contains(&format!("ca_file = {:?}", ca.display().to_string())));
        Ok(())
    });
}

#[test]
fn a_malformed_inline_connection_string_is_refused_at_load_without_the_key() {
    Jail::expect_with(|jail| {
        let text = format!("HostName=h;DeviceId=d;ModuleId=m;SharedAccesKey={SECRET_KEY}");
        let (_, main) = setup(jail, &format!("[hub]\nconnection_string = {text:?}\n"));
        let errors = load_err(&main);
        assert_eq!(keys(&errors), ["hub.connection_string"]);
        let shown = errors.to_string();
        assert!(
            shown.contains("SharedAccesKey") || shown.contains("unknown key"),
            "{shown}"
        );
        assert!(!shown.contains(SECRET_KEY), "{shown}");

        // A service string where a module one belongs is the wrong kind.
        let text = format!("HostName=h;SharedAccessKeyName=p;SharedAccessKey={SECRET_KEY}");
        let (_, main) = setup(jail, &format!("[hub]\nconnection_string = {text:?}\n"));
        assert_eq!(keys(&load_err(&main)), ["hub.connection_string"]);
        Ok(())
    });
}

#[test]
fn an_inline_service_string_is_checked_only_while_provisioning_is_due() {
    Jail::expect_with(|jail| {
        let body = "[provisioning]\nmethod = \"service\"\ndevice_id = \"gw1\"\n\
                    service_connection_string = \"HostName=h;SharedAccessKey=x\"\n";
        let (dir, main) = setup(jail, body);
        let errors = load_err(&main);
        assert_eq!(keys(&errors), ["provisioning.service_connection_string"]);

        // Provisioned already: run never reads the service credential again.
        write(
            &dir.join("state/module.connstr"),
            &module_string(SECRET_KEY),
        );
        load(&main)?;
        Ok(())
    });
}

#[test]
fn provisioning_needs_a_module_id() {
    Jail::expect_with(|jail| {
        let body = "[provisioning]\nmethod = \"service\"\ndevice_id = \"gw1\"\nmodule_id = \"\"\n\
                    service_connection_string_file = \"/run/service.connstr\"\n";
        let (_, main) = setup(jail, body);
        assert_eq!(keys(&load_err(&main)), ["provisioning.module_id"]);
        Ok(())
    });
}

#[test]
fn check_credentials_reads_and_parses_the_module_credential_as_run_does() {
    Jail::expect_with(|jail| {
        let file = jail.directory().join("module.connstr");
        let body = format!(
            "[hub]\nconnection_string_file = {:?}\n",
            file.display().to_string()
        );
        let (_, main_file) = setup(jail, &body);

        let s = load(&main_file)?;
        let errors = s.check_credentials().unwrap_err();
        assert_eq!(keys(&errors), ["hub.connection_string_file"]);
        assert!(errors.to_string().contains("cannot read"), "{errors}");

        write(&file, &module_string("not*base64!secretish"));
        let errors = s.check_credentials().unwrap_err();
        let e = find(&errors, "hub.connection_string_file");
        assert_eq!(e.origin.as_deref(), Some(file.to_str().unwrap()));
        assert!(e.message.contains("SharedAccessKey"), "{e}");
        assert!(!errors.to_string().contains("secretish"), "{errors}");
        assert_eq!(
            s.module_credentials().unwrap_err(),
            errors,
            "run sees the same"
        );

        write(&file, &module_string(SECRET_KEY));
        s.check_credentials().map_err(|e| e.to_string())?;
        assert_eq!(s.module_identity().unwrap().unwrap().module_id, "edgetwin");
        Ok(())
    });
}

#[test]
fn check_credentials_reads_the_service_credential_while_provisioning_is_due() {
    Jail::expect_with(|jail| {
        let dir = jail.directory().to_path_buf();
        let service = dir.join("service.connstr");
        let body = format!(
            "[provisioning]\nmethod = \"service\"\ndevice_id = \"gw1\"\n\
             service_connection_string_file = {:?}\n",
            service.display().to_string()
        );
        let (_, main) = setup(jail, &body);
        let s = load(&main)?;
        write(&service, "HostName=h;DeviceId=gw1;SharedAccessKey=AAAA");
        let errors = s.check_credentials().unwrap_err();
        assert_eq!(
            keys(&errors),
            ["provisioning.service_connection_string_file"]
        );

        write(
            &service,
            &format!(
                "HostName=h;SharedAccessKeyName=registryReadWrite;SharedAccessKey={SECRET_KEY}"
            ),
        );
        s.check_credentials().map_err(|e| e.to_string())?;

        // Once provisioned, the service file may be gone (it is not read again).
        std::fs::remove_file(&service).unwrap();
        write(
            &dir.join("state/module.connstr"),
            &module_string(SECRET_KEY),
        );
        s.check_credentials().map_err(|e| e.to_string())?;
        Ok(())
    });
}

#[test]
fn a_changed_inline_connection_string_is_a_hub_change_though_debug_hides_it() {
    Jail::expect_with(|jail| {
        let other_key = "b3RoZXIta2V5LW5vYm9keS1zaG91bGQtc2Vl";
        let config = |key: &str| format!("[hub]\nconnection_string = {:?}\n", module_string(key));
        let (_, main) = setup(jail, &config(SECRET_KEY));
        let old = load(&main)?;
        let same = load(&main)?;
        let (_, main) = setup(jail, &config(other_key));
        let new = load(&main)?;
        // What reload used to compare: equal, because the secret is redacted.
        assert_eq!(format!("{:?}", old.hub), format!("{:?}", new.hub));
        assert_ne!(old.hub, new.hub, "the changed secret is noticed");
        assert_eq!(old.hub, same.hub);
        assert_eq!(old, same);
        Ok(())
    });
}

#[test]
fn secrets_compare_by_value() {
    assert_eq!(Secret::new("abc"), Secret::new("abc"));
    assert_ne!(Secret::new("abc"), Secret::new("abd"));
    assert_ne!(Secret::new("abc"), Secret::new("abcd"));
    assert_ne!(Secret::new(""), Secret::new("a"));
}
