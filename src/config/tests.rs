//! Unit tests of the command line: defaults, flag forms, and errors that name their flag.

use super::*;

fn run(args: &[&str]) -> Result<Config, String> {
    let mut argv = vec!["baton", "run"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
    let Command::Run(run) = cli.command else {
        unreachable!("parsed `run`");
    };
    run.validate().map_err(|e| e.to_string())
}

#[test]
fn no_flags_is_a_working_laptop_config() {
    let config = run(&[]).unwrap();
    assert_eq!(config.elections, ["default"]);
    assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
    assert_eq!(config.timing, Timing::default());
    assert!(!config.identity.is_empty());
    assert!(matches!(
        config.store,
        StoreConfig::File { crash_grace, .. } if crash_grace == Duration::from_millis(25)
    ));
}

#[test]
fn crash_grace_is_a_duration_flag() {
    let config = run(&["--crash-grace", "200ms"]).unwrap();
    assert!(matches!(
        config.store,
        StoreConfig::File { crash_grace, .. } if crash_grace == Duration::from_millis(200)
    ));
    assert!(
        run(&["--crash-grace", "soon"])
            .unwrap_err()
            .contains("--crash-grace")
    );
}

#[test]
fn several_elections_by_repeat_or_comma() {
    let config = run(&["--election", "a", "--election", "b,c"]).unwrap();
    assert_eq!(config.elections, ["a", "b", "c"]);
}

#[test]
fn errors_name_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["--election", "Bad_Name"], "--election"),
        (&["--election", "a,a"], "--election"),
        (&["--identity", "has space"], "--identity"),
        (&["--identity", "a\u{202E}b"], "--identity"),
        (&["--identity", "a\u{200B}b"], "--identity"),
        (&["--renew-deadline", "15s"], "--renew-deadline"),
        (&["--retry-period", "10s"], "--retry-period"),
        (&["--lease-duration", "soon"], "--lease-duration"),
        (
            &["--lease-duration", "300000000000years"],
            "--lease-duration",
        ),
        (&["--drain-timeout", "300000000000years"], "--drain-timeout"),
        (&["--crash-grace", "300000000000years"], "--crash-grace"),
        (&["--listen", "localhost"], "--listen"),
        (&["--listen", "unix:"], "--listen"),
        (&["--tls-cert-file", "c.pem"], "--tls-key-file"),
        (&["--tls-key-file", "k.pem"], "--tls-cert-file"),
        (&["--tls-client-ca-file", "ca.pem"], "--tls-client-ca-file"),
        (
            &[
                "--listen",
                "unix:/run/b.sock",
                "--tls-cert-file",
                "c.pem",
                "--tls-key-file",
                "k.pem",
            ],
            "--tls-cert-file",
        ),
        (&["--metrics-listen", "nowhere"], "--metrics-listen"),
        (&["--health-listen", ":50052"], "--health-listen"),
        (&["--log-format", "xml"], "--log-format"),
    ];
    for (args, flag) in cases {
        let error = run(args).unwrap_err();
        assert!(error.contains(flag), "{args:?}: {error}");
    }
}

#[cfg(not(feature = "etcd"))]
#[test]
fn store_etcd_without_the_feature_names_it() {
    let error = run(&["--store", "etcd"]).unwrap_err();
    assert!(
        error.contains("--store etcd") && error.contains("--features etcd"),
        "{error}"
    );
}

#[cfg(feature = "etcd")]
#[test]
fn etcd_flags_become_a_store_config() {
    let config = run(&[
        "--store",
        "etcd",
        "--etcd-endpoints",
        "127.0.0.1:2379,http://h2:2379",
        "--etcd-endpoints",
        "http://h3:2379/",
        "--etcd-prefix",
        "team/",
    ])
    .unwrap();
    let StoreConfig::Etcd(etcd) = config.store else {
        panic!("an etcd store");
    };
    assert_eq!(
        etcd.endpoints,
        ["http://127.0.0.1:2379", "http://h2:2379", "http://h3:2379/"]
    );
    assert_eq!(etcd.prefix, "team/");
    assert_eq!((etcd.tls, etcd.auth), (None, None));

    let config = run(&[
        "--store",
        "etcd",
        "--etcd-endpoints",
        "h:2379",
        "--etcd-ca-file",
        "ca.pem",
        "--etcd-cert-file",
        "c.pem",
        "--etcd-key-file",
        "k.pem",
        "--etcd-username",
        "u",
        "--etcd-password-file",
        "pw",
    ])
    .unwrap();
    let StoreConfig::Etcd(etcd) = config.store else {
        panic!("an etcd store");
    };
    assert_eq!(etcd.endpoints, ["https://h:2379"], "TLS flags mean https");
    let tls = etcd.tls.expect("tls");
    assert_eq!(tls.ca_file, PathBuf::from("ca.pem"));
    assert_eq!(tls.identity, Some(("c.pem".into(), "k.pem".into())));
    assert_eq!(etcd.auth.expect("auth").username, "u");
}

#[cfg(feature = "etcd")]
#[test]
fn etcd_errors_name_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["--lease-duration", "2500ms"], "--lease-duration"),
        (
            &[
                "--lease-duration",
                "1s",
                "--renew-deadline",
                "500ms",
                "--retry-period",
                "100ms",
            ],
            "--lease-duration",
        ),
        (&["--etcd-endpoints", "ftp://h:2379"], "--etcd-endpoints"),
        (&["--etcd-endpoints", "h"], "--etcd-endpoints"),
        (&["--etcd-endpoints", "http://h:port"], "--etcd-endpoints"),
        (&["--etcd-endpoints", "https://h:2379"], "--etcd-ca-file"),
        (
            &["--etcd-endpoints", "http://h:2379", "--etcd-ca-file", "ca"],
            "--etcd-endpoints",
        ),
        (
            &["--etcd-ca-file", "ca", "--etcd-cert-file", "c"],
            "--etcd-key-file",
        ),
        (
            &["--etcd-ca-file", "ca", "--etcd-key-file", "k"],
            "--etcd-cert-file",
        ),
        (&["--etcd-username", "u"], "--etcd-password-file"),
        (&["--etcd-password-file", "pw"], "--etcd-username"),
    ];
    for (args, flag) in cases {
        let mut argv = vec!["--store", "etcd"];
        argv.extend_from_slice(args);
        let error = run(&argv).unwrap_err();
        assert!(error.contains(flag), "{args:?}: {error}");
    }
}

#[cfg(feature = "kubernetes")]
#[test]
fn kubernetes_flags() {
    let config = run(&[
        "--store",
        "kubernetes",
        "--namespace",
        "prod",
        "--lease-name",
        "x.y",
    ])
    .unwrap();
    assert_eq!(
        config.store,
        StoreConfig::Kubernetes {
            namespace: Some("prod".into()),
            lease_name: Some("x.y".into()),
        }
    );
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--lease-duration",
                "1500ms",
                "--renew-deadline",
                "1s",
                "--retry-period",
                "100ms",
            ],
            "--lease-duration",
        ),
        (&["--lease-duration", "0s"], "--lease-duration"),
        (&["--election", "a,b", "--lease-name", "x"], "--lease-name"),
        (&["--lease-name", "Bad_Name"], "--lease-name"),
        (&["--namespace", "a.b"], "--namespace"),
    ];
    for (args, flag) in cases {
        let mut argv = vec!["--store", "kubernetes"];
        argv.extend_from_slice(args);
        let error = run(&argv).unwrap_err();
        assert!(error.contains(flag), "{args:?}: {error}");
    }
    // Sub-second renew deadline and retry period are local timers: allowed.
    run(&[
        "--store",
        "kubernetes",
        "--lease-duration",
        "2s",
        "--renew-deadline",
        "1500ms",
        "--retry-period",
        "200ms",
    ])
    .unwrap();
}

#[cfg(not(feature = "kubernetes"))]
#[test]
fn store_kubernetes_without_the_feature_names_it() {
    let error = run(&["--store", "kubernetes"]).unwrap_err();
    assert!(
        error.contains("--store kubernetes") && error.contains("--features kubernetes"),
        "{error}"
    );
}

#[test]
fn listeners_metrics_and_tls() {
    let config = run(&[]).unwrap();
    assert_eq!((config.tls, config.metrics_listen), (None, None));
    assert_eq!(config.health_listen, None);

    let config = run(&["--listen", "unix:/run/baton/baton.sock"]).unwrap();
    assert_eq!(
        config.listen,
        ListenAddr::Unix("/run/baton/baton.sock".into())
    );

    let config = run(&[
        "--listen",
        "0.0.0.0:50051",
        "--tls-cert-file",
        "c.pem",
        "--tls-key-file",
        "k.pem",
        "--tls-client-ca-file",
        "ca.pem",
        "--metrics-listen",
        "0.0.0.0:9090",
        "--health-listen",
        "0.0.0.0:50052",
    ])
    .unwrap();
    assert_eq!(config.listen.to_string(), "0.0.0.0:50051");
    let tls = config.tls.expect("tls");
    assert_eq!(tls.cert_file, PathBuf::from("c.pem"));
    assert_eq!(tls.client_ca_file, Some(PathBuf::from("ca.pem")));
    assert_eq!(config.metrics_listen, Some("0.0.0.0:9090".parse().unwrap()));
    assert_eq!(config.health_listen, Some("0.0.0.0:50052".parse().unwrap()));
}

#[test]
fn log_format_is_global() {
    for argv in [
        &["baton", "--log-format", "json", "run"][..],
        &["baton", "run", "--log-format", "json"],
        &["baton", "status", "--log-format", "json"],
    ] {
        let cli = Cli::try_parse_from(argv).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json, "{argv:?}");
    }
    let cli = Cli::try_parse_from(["baton", "run"]).unwrap();
    assert_eq!(cli.log_format, LogFormat::Text);
}

#[test]
fn election_names() {
    for ok in ["a", "orders", "feed-1.eu", "0"] {
        assert!(valid_election_name(ok), "{ok}");
    }
    for bad in ["", "-a", "a-", "A", "a_b", "a/b", "..", &"x".repeat(64)] {
        assert!(!valid_election_name(bad), "{bad}");
    }
}

#[test]
fn balance_is_off_unless_asked() {
    assert!(!run(&[]).unwrap().balance);
    assert!(run(&["--election", "a,b", "--balance"]).unwrap().balance);
}
