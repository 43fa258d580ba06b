//! StateFun's module format (`module.yaml`, 3.x): remote function endpoints and Kafka
//! ingresses and egresses, read into typed specifications.
//!
//! Why it exists: StateFun users describe their application in a `module.yaml` of
//! `kind`/`spec` documents; our runtime takes the same file (issue 6). This module
//! only reads and checks it; the runtime wires what it describes.
//!
//! What it promises: a document stream (`---` separated) of
//! `io.statefun.endpoints.v2/http`, `io.statefun.kafka.v1/ingress` and
//! `io.statefun.kafka.v1/egress` components, with StateFun's defaults where a field is
//! left out. Stricter than StateFun, which ignores what it does not know: an unknown
//! kind, an unknown or misspelt field, a value of the wrong type or an invalid value is
//! an error naming the line and the field. Durations take Flink's form (`2m`, `1 min`,
//! `20s`, `100ms`; a bare number is milliseconds). Compatibility notes:
//! `docs/protocol.md`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use statefun_sdk::TypeName;

/// A module: everything its documents declare, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModuleSpec {
    /// Remote function endpoints.
    pub endpoints: Vec<HttpEndpoint>,
    /// Remote function endpoints over statefun-rs's gRPC service
    /// (`io.statefun-rs.endpoints.v1/grpc`, ours).
    pub grpc_endpoints: Vec<GrpcEndpoint>,
    /// Kafka ingresses.
    pub ingresses: Vec<KafkaIngress>,
    /// Kafka egresses.
    pub egresses: Vec<KafkaEgress>,
    /// What StateFun leaves to Flink's configuration (`io.statefun-rs.v1/runtime`,
    /// ours; at most one).
    pub runtime: RuntimeSpec,
}

/// `io.statefun-rs.endpoints.v1/grpc`: functions served by statefun-rs's gRPC service
/// (`statefun_sdk::remote::RemoteServer`).
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcEndpoint {
    /// The function types served.
    pub functions: FunctionsPattern,
    /// `http://host:port`.
    pub url: String,
    /// The whole call including retries. Default 2 min.
    pub call_timeout: Duration,
    /// Connecting. Default 20 s.
    pub connect_timeout: Duration,
}

/// `io.statefun-rs.v1/runtime`: the runtime's own settings, where StateFun uses Flink's
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeSpec {
    /// The application: its consumer group and the prefix of its internal and
    /// changelog topics. Default: the first ingress's `consumerGroupId`.
    pub application_id: Option<String>,
    /// Runtime partitions, fixed for the life of the state. Default 8.
    pub partitions: u32,
    /// Where the instance keeps its RocksDB state. Default: `statefun-state`.
    pub state_dir: Option<String>,
    /// How often state, messages and egress are committed. Default 100 ms.
    pub commit_interval: Duration,
    /// Topic for dead letters (bad records, parked addresses' messages). Default: none
    /// (logged only).
    pub dead_letter_topic: Option<String>,
    /// Per egress id, the topics its records may name (they must exist).
    pub egress_topics: BTreeMap<TypeName, Vec<String>>,
    /// Attempts per message before the address is parked. Default 6.
    pub max_attempts: u32,
    /// First retry backoff, doubling. Default 100 ms.
    pub initial_backoff: Duration,
    /// Longest retry backoff. Default 10 s.
    pub max_backoff: Duration,
    /// librdkafka properties for every Kafka client of the instance
    /// (`kafkaProperties`): `security.protocol`, `ssl.*`, `sasl.*`, `client.id`, tuning.
    /// The runtime refuses those it owns when it starts. Default: none.
    pub kafka_properties: BTreeMap<String, String>,
    /// Replication factor of the internal and changelog topics the runtime creates
    /// (`replicationFactor`). Default: min(3, brokers).
    pub replication_factor: Option<i32>,
    /// `min.insync.replicas` of the topics the runtime creates (`minInsyncReplicas`).
    /// Default: the replication factor - 1, at least 1.
    pub min_insync_replicas: Option<i32>,
    /// Static group membership (`staticMembership`): a restarted instance gets its
    /// partitions back at once. Default true.
    pub static_membership: bool,
    /// How long a silent instance keeps its partitions (`sessionTimeout`). Default 10 s.
    pub session_timeout: Duration,
}

impl Default for RuntimeSpec {
    fn default() -> Self {
        RuntimeSpec {
            application_id: None,
            partitions: 8,
            state_dir: None,
            commit_interval: Duration::from_millis(100),
            dead_letter_topic: None,
            egress_topics: BTreeMap::new(),
            max_attempts: 6,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            kafka_properties: BTreeMap::new(),
            replication_factor: None,
            min_insync_replicas: None,
            static_membership: true,
            session_timeout: Duration::from_secs(10),
        }
    }
}

/// Which function types an endpoint serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FunctionsPattern {
    /// One function type (`namespace/name`).
    Type(TypeName),
    /// Every type of a namespace (`namespace/*`).
    Namespace(String),
}

impl FunctionsPattern {
    /// Whether `t` is served by this endpoint.
    pub fn matches(&self, t: &TypeName) -> bool {
        match self {
            FunctionsPattern::Type(x) => x == t,
            FunctionsPattern::Namespace(ns) => t.namespace() == ns,
        }
    }
}

/// `io.statefun.endpoints.v2/http`: functions served over HTTP.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpEndpoint {
    /// The function types served.
    pub functions: FunctionsPattern,
    /// The URL; `{function.name}` is replaced by the function type's name.
    pub url_path_template: String,
    /// Messages queued per address while a request is in flight before the partition
    /// pauses its input; `None` = no limit (StateFun's 0 or less). Default 1000.
    pub max_num_batch_requests: Option<u32>,
    /// The whole call including retries. Default 2 min.
    pub call_timeout: Duration,
    /// Connecting, per attempt. Default 20 s.
    pub connect_timeout: Duration,
    /// Lifetime of a pooled connection. Default 15 s.
    pub pool_ttl: Duration,
    /// Pooled connections at most. Default 1024.
    pub pool_size: u32,
    /// Largest request or response. Default 32 MiB.
    pub payload_max_bytes: u64,
    /// `https`: a PEM file of certificate authorities to trust besides the public roots
    /// (`trust_cacerts`).
    pub trust_cacerts: Option<std::path::PathBuf>,
    /// `https`: the client certificate chain and key, PEM files (`client_cert`,
    /// `client_key`).
    pub client_identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl HttpEndpoint {
    /// The URL of function type `t`.
    pub fn url(&self, t: &TypeName) -> String {
        self.url_path_template.replace("{function.name}", t.name())
    }
}

/// Where a Kafka ingress starts when its group has no offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPosition {
    /// The group's committed offsets (falling back to `auto_offset_reset`).
    GroupOffsets,
    /// The earliest offsets.
    Earliest,
    /// The latest offsets (StateFun's default).
    Latest,
    /// Given offsets per `topic/partition`.
    SpecificOffsets(BTreeMap<String, i64>),
    /// The offsets at a date (`yyyy-MM-dd HH:mm:ss.SSS Z`).
    Date(String),
}

/// One topic of a Kafka ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressTopic {
    /// The topic.
    pub topic: String,
    /// The type name its values are given.
    pub value_type: TypeName,
    /// The function types each record goes to (the record key is the id).
    pub targets: Vec<TypeName>,
}

/// `io.statefun.kafka.v1/ingress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaIngress {
    /// The ingress id.
    pub id: TypeName,
    /// `bootstrap.servers`.
    pub address: String,
    /// `group.id`.
    pub consumer_group_id: String,
    /// The topics and their targets.
    pub topics: Vec<IngressTopic>,
    /// Whether to start at the earliest offset when an offset is missing or out of
    /// range (else the latest, StateFun's default).
    pub auto_offset_reset_earliest: bool,
    /// Where to start. Default: latest.
    pub startup_position: StartupPosition,
    /// Further consumer properties.
    pub properties: BTreeMap<String, String>,
}

/// How a Kafka egress delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverySemantic {
    /// Fire and forget.
    None,
    /// Retries, possibly twice (StateFun's default).
    AtLeastOnce,
    /// Transactions; records visible to `read_committed` consumers once committed.
    ExactlyOnce {
        /// `transaction.timeout.ms`.
        transaction_timeout: Duration,
    },
}

/// `io.statefun.kafka.v1/egress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaEgress {
    /// The egress id (what functions address).
    pub id: TypeName,
    /// `bootstrap.servers`.
    pub address: String,
    /// The delivery guarantee.
    pub delivery: DeliverySemantic,
    /// Further producer properties.
    pub properties: BTreeMap<String, String>,
}

/// Why a module file was refused: where, and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("module.yaml line {line}: {message}")]
pub struct ModuleError {
    /// The line (1-based) of the error, or of the start of the document it is in.
    pub line: usize,
    /// What is wrong, naming the field.
    pub message: String,
}

// ---- the documents as written ---------------------------------------------------

#[derive(Deserialize)]
#[serde(tag = "kind", content = "spec", deny_unknown_fields)]
enum Component {
    #[serde(rename = "io.statefun.endpoints.v2/http")]
    Http(HttpSpec),
    #[serde(rename = "io.statefun.kafka.v1/ingress")]
    Ingress(IngressSpec),
    #[serde(rename = "io.statefun.kafka.v1/egress")]
    Egress(EgressSpec),
    #[serde(rename = "io.statefun-rs.endpoints.v1/grpc")]
    Grpc(GrpcSpec),
    #[serde(rename = "io.statefun-rs.v1/runtime")]
    Runtime(RuntimeDoc),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrpcSpec {
    functions: String,
    url: String,
    call: Option<FlinkDuration>,
    connect: Option<FlinkDuration>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuntimeDoc {
    application_id: Option<String>,
    partitions: Option<u32>,
    state_dir: Option<String>,
    commit_interval: Option<FlinkDuration>,
    dead_letter_topic: Option<String>,
    #[serde(default)]
    egress_topics: BTreeMap<String, Vec<String>>,
    max_attempts: Option<u32>,
    initial_backoff: Option<FlinkDuration>,
    max_backoff: Option<FlinkDuration>,
    #[serde(default)]
    kafka_properties: BTreeMap<String, Scalar>,
    replication_factor: Option<i32>,
    min_insync_replicas: Option<i32>,
    static_membership: Option<bool>,
    session_timeout: Option<FlinkDuration>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpSpec {
    functions: String,
    url_path_template: String,
    max_num_batch_requests: Option<i64>,
    transport: Option<TransportSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransportSpec {
    #[serde(rename = "type")]
    kind: Option<String>,
    call: Option<FlinkDuration>,
    connect: Option<FlinkDuration>,
    timeouts: Option<TimeoutsSpec>,
    pool_ttl: Option<FlinkDuration>,
    pool_size: Option<u32>,
    payload_max_bytes: Option<u64>,
    trust_cacerts: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
    client_key_password: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutsSpec {
    call: Option<FlinkDuration>,
    connect: Option<FlinkDuration>,
    read: Option<FlinkDuration>,
    write: Option<FlinkDuration>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IngressSpec {
    id: String,
    address: Option<String>,
    consumer_group_id: Option<String>,
    topics: Vec<IngressTopicSpec>,
    auto_offset_reset_position: Option<String>,
    startup_position: Option<StartupSpec>,
    #[serde(default)]
    properties: Vec<BTreeMap<String, Scalar>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IngressTopicSpec {
    topic: String,
    value_type: String,
    targets: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartupSpec {
    #[serde(rename = "type")]
    kind: String,
    offsets: Option<Vec<BTreeMap<String, i64>>>,
    date: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EgressSpec {
    id: String,
    address: Option<String>,
    delivery_semantic: Option<DeliverySpec>,
    #[serde(default)]
    properties: Vec<BTreeMap<String, Scalar>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeliverySpec {
    #[serde(rename = "type")]
    kind: String,
    transaction_timeout: Option<FlinkDuration>,
    transaction_timeout_millis: Option<u64>,
}

/// A property value: YAML writes numbers and booleans unquoted.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Scalar::Text(s) => s,
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

/// A duration in Flink's form: a number and an optional unit; a bare number is ms.
struct FlinkDuration(Duration);

impl<'de> Deserialize<'de> for FlinkDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<FlinkDuration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Millis(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Millis(ms) => Ok(FlinkDuration(Duration::from_millis(ms))),
            Raw::Text(s) => parse_duration(&s).map(FlinkDuration).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `2m`, `1 min`, `20s`, `10 sec`, `15min`, `100ms`, `3 h`, `1d`, `500`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected a number and a unit, e.g. 20s or 2 min"))?;
    let ms = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "ms" | "milli" | "millis" | "millisecond" | "milliseconds" => 1,
        "s" | "sec" | "secs" | "second" | "seconds" => 1_000,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
        "h" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        other => return Err(format!("invalid duration {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("invalid duration {s:?}: too long"))
}

// ---- reading ------------------------------------------------------------------------

/// Reads a module file (module docs).
pub fn parse(text: &str) -> Result<ModuleSpec, ModuleError> {
    let starts = document_lines(text);
    let mut module = ModuleSpec::default();
    let mut runtime_seen = false;
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let start = starts.get(index).copied().unwrap_or(1);
        let component: Option<Component> = Option::deserialize(document).map_err(|e| ModuleError {
            line: e.location().map_or(start, |l| l.line()),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ModuleError { line: start, message };
        match component {
            None => {} // an empty document
            Some(Component::Http(s)) => module.endpoints.push(http(s).map_err(invalid)?),
            Some(Component::Ingress(s)) => module.ingresses.push(ingress(s).map_err(invalid)?),
            Some(Component::Egress(s)) => module.egresses.push(egress(s).map_err(invalid)?),
            Some(Component::Grpc(s)) => module.grpc_endpoints.push(grpc(s).map_err(invalid)?),
            Some(Component::Runtime(s)) => {
                if std::mem::replace(&mut runtime_seen, true) {
                    return Err(invalid("a second io.statefun-rs.v1/runtime document".into()));
                }
                module.runtime = runtime(s).map_err(invalid)?;
            }
        }
    }
    Ok(module)
}

/// The first line of each document of a stream: line 1, then each line after a `---`.
fn document_lines(text: &str) -> Vec<usize> {
    let mut starts = vec![1];
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            if i == 0 {
                starts[0] = 2;
            } else {
                starts.push(i + 2);
            }
        }
    }
    starts
}

fn type_name(field: &str, s: &str) -> Result<TypeName, String> {
    TypeName::parse(s).map_err(|_| format!("{field}: {s:?} is not a type name <namespace>/<name>"))
}

fn functions_pattern(functions: &str) -> Result<FunctionsPattern, String> {
    Ok(match functions.split_once('/') {
        Some((ns, "*")) if !ns.contains('*') => {
            // A namespace a type name can have: not empty, no `/` or whitespace.
            TypeName::from_parts(ns, "*")
                .ok()
                .filter(|t| t.namespace() == ns)
                .ok_or_else(|| format!("spec.functions: {functions:?}: {ns:?} is not a namespace"))?;
            FunctionsPattern::Namespace(ns.to_owned())
        }
        _ if functions.contains('*') => {
            return Err(format!(
                "spec.functions: {functions:?}: only <namespace>/<name> or <namespace>/* are supported"
            ));
        }
        _ => FunctionsPattern::Type(type_name("spec.functions", functions)?),
    })
}

/// A certificate or key file as StateFun names it: `file:/path` or a plain path.
fn pem_path(field: &str, s: &str) -> Result<std::path::PathBuf, String> {
    if s.starts_with("classpath:") {
        return Err(format!(
            "{field}: {s:?}: classpath resources do not exist here; use file:/path"
        ));
    }
    let path = s.strip_prefix("file:").unwrap_or(s);
    if path.is_empty() {
        return Err(format!("{field}: empty path"));
    }
    Ok(std::path::PathBuf::from(path))
}

fn grpc(s: GrpcSpec) -> Result<GrpcEndpoint, String> {
    if !s.url.starts_with("http://") {
        return Err(format!("spec.url: {:?} is not an http:// URL", s.url));
    }
    let call_timeout = s.call.map_or(Duration::from_secs(120), |d| d.0);
    if call_timeout.is_zero() {
        return Err("spec.call: the call timeout must be above 0".into());
    }
    Ok(GrpcEndpoint {
        functions: functions_pattern(&s.functions)?,
        url: s.url,
        call_timeout,
        connect_timeout: s.connect.map_or(Duration::from_secs(20), |d| d.0).min(call_timeout),
    })
}

fn runtime(s: RuntimeDoc) -> Result<RuntimeSpec, String> {
    let d = RuntimeSpec::default();
    let spec = RuntimeSpec {
        application_id: s.application_id,
        partitions: s.partitions.unwrap_or(d.partitions),
        state_dir: s.state_dir,
        commit_interval: s.commit_interval.map_or(d.commit_interval, |x| x.0),
        dead_letter_topic: s.dead_letter_topic,
        egress_topics: s
            .egress_topics
            .into_iter()
            .map(|(id, topics)| Ok((type_name("spec.egressTopics", &id)?, topics)))
            .collect::<Result<_, String>>()?,
        max_attempts: s.max_attempts.unwrap_or(d.max_attempts),
        initial_backoff: s.initial_backoff.map_or(d.initial_backoff, |x| x.0),
        max_backoff: s.max_backoff.map_or(d.max_backoff, |x| x.0),
        kafka_properties: s
            .kafka_properties
            .into_iter()
            .map(|(k, v)| (k, v.into_string()))
            .collect(),
        replication_factor: s.replication_factor,
        min_insync_replicas: s.min_insync_replicas,
        static_membership: s.static_membership.unwrap_or(d.static_membership),
        session_timeout: s.session_timeout.map_or(d.session_timeout, |x| x.0),
    };
    if let Some(k) = spec.kafka_properties.keys().find(|k| k.trim().is_empty()) {
        return Err(format!("spec.kafkaProperties: {k:?} is not a property name"));
    }
    if spec.replication_factor.is_some_and(|r| r < 1) {
        return Err("spec.replicationFactor: must be at least 1".into());
    }
    if spec.min_insync_replicas.is_some_and(|r| r < 1) {
        return Err("spec.minInsyncReplicas: must be at least 1".into());
    }
    if let (Some(rf), Some(isr)) = (spec.replication_factor, spec.min_insync_replicas)
        && isr > rf
    {
        return Err(format!(
            "spec.minInsyncReplicas: {isr} is above spec.replicationFactor ({rf}); no write could succeed"
        ));
    }
    if spec.session_timeout < Duration::from_secs(1) {
        return Err("spec.sessionTimeout: must be at least 1 s".into());
    }
    if spec.partitions == 0 || spec.partitions > 65_536 {
        return Err("spec.partitions: must be between 1 and 65536".into());
    }
    if spec.max_attempts == 0 {
        return Err("spec.maxAttempts: must be at least 1".into());
    }
    if spec.commit_interval.is_zero() {
        return Err("spec.commitInterval: must be above 0".into());
    }
    if let Some((id, _)) = spec.egress_topics.iter().find(|(_, t)| t.is_empty()) {
        return Err(format!("spec.egressTopics.{id}: list at least one topic"));
    }
    if spec.application_id.as_deref().is_some_and(|a| a.trim().is_empty()) {
        return Err("spec.applicationId: must not be empty".into());
    }
    Ok(spec)
}

fn http(s: HttpSpec) -> Result<HttpEndpoint, String> {
    let functions = functions_pattern(&s.functions)?;
    if !(s.url_path_template.starts_with("http://") || s.url_path_template.starts_with("https://")) {
        return Err(format!(
            "spec.urlPathTemplate: {:?} is not an http:// or https:// URL",
            s.url_path_template
        ));
    }
    let max = s.max_num_batch_requests.unwrap_or(1000);
    let t = s.transport.unwrap_or(TransportSpec {
        kind: None,
        call: None,
        connect: None,
        timeouts: None,
        pool_ttl: None,
        pool_size: None,
        payload_max_bytes: None,
        trust_cacerts: None,
        client_cert: None,
        client_key: None,
        client_key_password: None,
    });
    match t.kind.as_deref() {
        None | Some("io.statefun.transports.v1/async") | Some("io.statefun.transports.v1/okhttp") => {}
        Some(other) => return Err(format!("spec.transport.type: unknown transport {other:?}")),
    }
    let nested = t.timeouts.as_ref();
    let call = nested.and_then(|n| n.call.as_ref()).or(t.call.as_ref()).map(|d| d.0);
    let connect = nested
        .and_then(|n| n.connect.as_ref())
        .or(t.connect.as_ref())
        .map(|d| d.0);
    let endpoint = HttpEndpoint {
        functions,
        url_path_template: s.url_path_template,
        max_num_batch_requests: u32::try_from(max).ok().filter(|m| *m > 0),
        call_timeout: call.unwrap_or(Duration::from_secs(120)),
        // A connect timeout left out never exceeds the call timeout.
        connect_timeout: connect.unwrap_or(Duration::from_secs(20).min(call.unwrap_or(Duration::from_secs(120)))),
        pool_ttl: t.pool_ttl.map_or(Duration::from_secs(15), |d| d.0),
        pool_size: t.pool_size.unwrap_or(1024),
        payload_max_bytes: t.payload_max_bytes.unwrap_or(32 << 20),
        trust_cacerts: t
            .trust_cacerts
            .as_deref()
            .map(|p| pem_path("spec.transport.trust_cacerts", p))
            .transpose()?,
        client_identity: match (t.client_cert.as_deref(), t.client_key.as_deref()) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((
                pem_path("spec.transport.client_cert", c)?,
                pem_path("spec.transport.client_key", k)?,
            )),
            _ => return Err("spec.transport: client_cert and client_key go together".into()),
        },
    };
    if t.client_key_password.is_some() {
        return Err(
            "spec.transport.client_key_password: encrypted keys are not supported; give an unencrypted PEM key".into(),
        );
    }
    if endpoint.call_timeout.is_zero() {
        return Err("spec.transport.call: the call timeout must be above 0".into());
    }
    if endpoint.connect_timeout > endpoint.call_timeout {
        return Err("spec.transport.connect: the connect timeout is longer than the call timeout".into());
    }
    for (field, d) in [
        ("read", nested.and_then(|n| n.read.as_ref())),
        ("write", nested.and_then(|n| n.write.as_ref())),
    ] {
        if d.is_some_and(|d| d.0 > endpoint.call_timeout) {
            return Err(format!("spec.transport.timeouts.{field}: longer than the call timeout"));
        }
    }
    Ok(endpoint)
}

fn properties(list: Vec<BTreeMap<String, Scalar>>) -> BTreeMap<String, String> {
    list.into_iter().flatten().map(|(k, v)| (k, v.into_string())).collect()
}

/// `address` or `bootstrap.servers` among the properties.
fn required(
    field: &str,
    value: Option<String>,
    props: &BTreeMap<String, String>,
    property: &str,
) -> Result<String, String> {
    value
        .or_else(|| props.get(property).cloned())
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| format!("spec.{field} is missing (or set {property} in spec.properties)"))
}

fn ingress(s: IngressSpec) -> Result<KafkaIngress, String> {
    let props = properties(s.properties);
    if s.topics.is_empty() {
        return Err("spec.topics: at least one topic is needed".into());
    }
    let topics = s
        .topics
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            if t.targets.is_empty() {
                return Err(format!("spec.topics[{i}].targets: at least one target is needed"));
            }
            Ok(IngressTopic {
                value_type: type_name(&format!("spec.topics[{i}].valueType"), &t.value_type)?,
                targets: t
                    .targets
                    .iter()
                    .enumerate()
                    .map(|(j, x)| type_name(&format!("spec.topics[{i}].targets[{j}]"), x))
                    .collect::<Result<_, _>>()?,
                topic: t.topic,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let earliest = match s
        .auto_offset_reset_position
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("latest") => false,
        Some("earliest") => true,
        Some(other) => {
            return Err(format!(
                "spec.autoOffsetResetPosition: {other:?} is not earliest or latest"
            ));
        }
    };
    let startup = match s.startup_position {
        None => StartupPosition::Latest,
        Some(p) => match p.kind.as_str() {
            "group-offsets" => StartupPosition::GroupOffsets,
            "earliest" => StartupPosition::Earliest,
            "latest" => StartupPosition::Latest,
            "specific-offsets" => {
                let offsets: BTreeMap<String, i64> = p
                    .offsets
                    .ok_or("spec.startupPosition.offsets is missing for specific-offsets")?
                    .into_iter()
                    .flatten()
                    .collect();
                if let Some(k) = offsets
                    .keys()
                    .find(|k| k.rsplit_once('/').is_none_or(|(_, n)| n.parse::<i32>().is_err()))
                {
                    return Err(format!(
                        "spec.startupPosition.offsets: {k:?} is not <topic>/<partition>"
                    ));
                }
                StartupPosition::SpecificOffsets(offsets)
            }
            "date" => StartupPosition::Date(p.date.ok_or("spec.startupPosition.date is missing for date")?),
            other => {
                return Err(format!(
                    "spec.startupPosition.type: {other:?} is not group-offsets, earliest, latest, specific-offsets or date"
                ));
            }
        },
    };
    Ok(KafkaIngress {
        id: type_name("spec.id", &s.id)?,
        address: required("address", s.address, &props, "bootstrap.servers")?,
        consumer_group_id: required("consumerGroupId", s.consumer_group_id, &props, "group.id")?,
        topics,
        auto_offset_reset_earliest: earliest,
        startup_position: startup,
        properties: props,
    })
}

fn egress(s: EgressSpec) -> Result<KafkaEgress, String> {
    let props = properties(s.properties);
    let delivery = match s.delivery_semantic {
        None => DeliverySemantic::AtLeastOnce,
        Some(d) => match d.kind.as_str() {
            "at-least-once" => DeliverySemantic::AtLeastOnce,
            "none" => DeliverySemantic::None,
            "exactly-once" => {
                let timeout = d
                    .transaction_timeout_millis
                    .map(Duration::from_millis)
                    .or(d.transaction_timeout.map(|t| t.0))
                    .ok_or("spec.deliverySemantic.transactionTimeout is needed for exactly-once")?;
                DeliverySemantic::ExactlyOnce {
                    transaction_timeout: timeout,
                }
            }
            other => {
                return Err(format!(
                    "spec.deliverySemantic.type: {other:?} is not at-least-once, exactly-once or none"
                ));
            }
        },
    };
    Ok(KafkaEgress {
        id: type_name("spec.id", &s.id)?,
        address: required("address", s.address, &props, "bootstrap.servers")?,
        delivery,
        properties: props,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "\
kind: io.statefun.endpoints.v2/http
spec:
  functions: com.example/*
  urlPathTemplate: http://functions:8000/statefun/{function.name}
  maxNumBatchRequests: 500
  transport:
    type: io.statefun.transports.v1/async
    call: 2 min
    connect: 20s
    pool_ttl: 15s
    pool_size: 64
---
kind: io.statefun.kafka.v1/ingress
spec:
  id: com.example/names
  address: kafka:9092
  consumerGroupId: my-group
  topics:
    - topic: names
      valueType: com.example/User
      targets:
        - com.example/greeter
  startupPosition:
    type: specific-offsets
    offsets:
      - names/0: 91
  properties:
    - max.poll.records: 500
---
kind: io.statefun.kafka.v1/egress
spec:
  id: com.example/out
  address: kafka:9092
  deliverySemantic:
    type: exactly-once
    transactionTimeout: 15min
";

    #[test]
    fn tls_options_of_the_async_transport_read_as_paths_and_classpath_is_refused() {
        let doc = |transport: &str| {
            format!(
                "kind: io.statefun.endpoints.v2/http\nspec:\n  functions: a/b\n  urlPathTemplate: https://x/\n  transport:\n{transport}"
            )
        };
        let m = parse(&doc(
            "    trust_cacerts: file:/etc/ca.pem\n    client_cert: /etc/c.pem\n    client_key: file:/etc/k.pem\n",
        ))
        .unwrap();
        let e = &m.endpoints[0];
        assert_eq!(e.trust_cacerts.as_deref(), Some(std::path::Path::new("/etc/ca.pem")));
        assert_eq!(e.client_identity, Some(("/etc/c.pem".into(), "/etc/k.pem".into())));
        for (transport, expected) in [
            (
                "    trust_cacerts: classpath:ca.pem\n",
                "spec.transport.trust_cacerts: \"classpath:ca.pem\": classpath",
            ),
            ("    client_cert: /c.pem\n", "client_cert and client_key go together"),
            (
                "    client_cert: /c.pem\n    client_key: /k.pem\n    client_key_password: x\n",
                "client_key_password: encrypted keys are not supported",
            ),
        ] {
            let e = parse(&doc(transport)).unwrap_err().to_string();
            assert!(e.contains(expected), "{e} should contain {expected}");
        }
    }

    #[test]
    fn our_runtime_document_and_grpc_endpoints_read_with_defaults_and_checks() {
        let text = "\
kind: io.statefun-rs.v1/runtime
spec:
  applicationId: greeter-app
  partitions: 4
  commitInterval: 50ms
  deadLetterTopic: dead
  egressTopics:
    com.example/out: [greetings, farewells]
---
kind: io.statefun-rs.endpoints.v1/grpc
spec:
  functions: com.example/greeter
  url: http://functions:9000
  call: 30s
";
        let m = parse(text).unwrap();
        assert_eq!(m.runtime.application_id.as_deref(), Some("greeter-app"));
        assert_eq!(m.runtime.partitions, 4);
        assert_eq!(m.runtime.commit_interval, Duration::from_millis(50));
        assert_eq!(m.runtime.max_attempts, 6, "default");
        assert_eq!(
            m.runtime.egress_topics[&TypeName::parse("com.example/out").unwrap()],
            ["greetings", "farewells"]
        );
        assert!(m.runtime.kafka_properties.is_empty(), "default");
        assert_eq!(
            (m.runtime.replication_factor, m.runtime.min_insync_replicas),
            (None, None),
            "default: decided from the brokers"
        );
        assert!(m.runtime.static_membership, "default");
        assert_eq!(m.grpc_endpoints[0].call_timeout, Duration::from_secs(30));
        assert_eq!(m.grpc_endpoints[0].connect_timeout, Duration::from_secs(20));
        for (bad, expected) in [
            (
                "kind: io.statefun-rs.v1/runtime\nspec:\n  partitons: 4\n",
                "line 3: spec: unknown field `partitons`",
            ),
            (
                "kind: io.statefun-rs.v1/runtime\nspec:\n  partitions: 0\n",
                "line 1: spec.partitions: must be between 1 and 65536",
            ),
            (
                "kind: io.statefun-rs.v1/runtime\nspec:\n  replicationFactor: 2\n  minInsyncReplicas: 3\n",
                "line 1: spec.minInsyncReplicas: 3 is above spec.replicationFactor (2)",
            ),
            (
                "kind: io.statefun-rs.v1/runtime\nspec:\n  kafkaProperties: [security.protocol]\n",
                "line 3: spec.kafkaProperties: invalid type: sequence, expected a map",
            ),
            (
                "kind: io.statefun-rs.v1/runtime\nspec: {}\n---\nkind: io.statefun-rs.v1/runtime\nspec: {}\n",
                "line 4: a second io.statefun-rs.v1/runtime document",
            ),
            (
                "kind: io.statefun-rs.endpoints.v1/grpc\nspec:\n  functions: a/b\n  url: https://x:1\n",
                "line 1: spec.url: \"https://x:1\" is not an http:// URL",
            ),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(expected), "{e} should contain {expected}");
        }
    }

    #[test]
    fn the_runtime_documents_kafka_settings_read_as_strings_with_replication_and_membership() {
        let text = "\
kind: io.statefun-rs.v1/runtime
spec:
  kafkaProperties:
    security.protocol: SASL_SSL
    sasl.mechanisms: SCRAM-SHA-256
    enable.ssl.certificate.verification: true
    message.max.bytes: 2000000
  replicationFactor: 3
  minInsyncReplicas: 2
  staticMembership: false
  sessionTimeout: 30s
";
        let rt = parse(text).unwrap().runtime;
        assert_eq!(rt.kafka_properties["security.protocol"], "SASL_SSL");
        assert_eq!(rt.kafka_properties["enable.ssl.certificate.verification"], "true");
        assert_eq!(rt.kafka_properties["message.max.bytes"], "2000000");
        assert_eq!((rt.replication_factor, rt.min_insync_replicas), (Some(3), Some(2)));
        assert!(!rt.static_membership);
        assert_eq!(rt.session_timeout, Duration::from_secs(30));
    }

    #[test]
    fn a_full_module_reads_into_typed_specs_with_statefuns_defaults() {
        let m = parse(FULL).unwrap();
        let e = &m.endpoints[0];
        assert_eq!(e.functions, FunctionsPattern::Namespace("com.example".into()));
        assert!(e.functions.matches(&TypeName::parse("com.example/greeter").unwrap()));
        assert!(!e.functions.matches(&TypeName::parse("other/greeter").unwrap()));
        assert_eq!(
            e.url(&TypeName::parse("com.example/greeter").unwrap()),
            "http://functions:8000/statefun/greeter"
        );
        assert_eq!(e.max_num_batch_requests, Some(500));
        assert_eq!(
            (e.call_timeout, e.connect_timeout),
            (Duration::from_secs(120), Duration::from_secs(20))
        );
        assert_eq!((e.pool_size, e.payload_max_bytes), (64, 32 << 20));
        let i = &m.ingresses[0];
        assert_eq!(
            i.topics[0].targets,
            vec![TypeName::parse("com.example/greeter").unwrap()]
        );
        assert_eq!(
            i.startup_position,
            StartupPosition::SpecificOffsets([("names/0".to_string(), 91)].into())
        );
        assert_eq!(i.properties["max.poll.records"], "500");
        assert!(!i.auto_offset_reset_earliest);
        assert_eq!(
            m.egresses[0].delivery,
            DeliverySemantic::ExactlyOnce {
                transaction_timeout: Duration::from_secs(900)
            }
        );

        let minimal =
            parse("kind: io.statefun.endpoints.v2/http\nspec:\n  functions: a/b\n  urlPathTemplate: http://f/\n")
                .unwrap();
        let e = &minimal.endpoints[0];
        assert_eq!(e.max_num_batch_requests, Some(1000), "StateFun's default");
        assert_eq!(e.pool_ttl, Duration::from_secs(15));
    }

    #[test]
    fn bad_entries_are_errors_naming_the_line_and_the_field() {
        let cases: Vec<(String, usize, &str)> = vec![
            // Found by the YAML reader: the line of the field (of its block, for a value
            // read through a buffer, like a duration).
            (
                FULL.replace("  consumerGroupId:", "  consumerGroup:"),
                17,
                "unknown field `consumerGroup`",
            ),
            (
                FULL.replace("io.statefun.kafka.v1/egress", "io.statefun.kafka.v9/egress"),
                30,
                "unknown variant",
            ),
            (FULL.replace("pool_size: 64", "pool_size: many"), 11, "pool_size"),
            (FULL.replace("call: 2 min", "call: 2 fortnights"), 7, "unknown unit"),
            // Checked after reading: the line where the document starts.
            (
                FULL.replace("functions: com.example/*", "functions: com.*/x"),
                1,
                "spec.functions",
            ),
            (
                FULL.replace("http://functions", "ftp://functions"),
                1,
                "spec.urlPathTemplate",
            ),
            (
                FULL.replace("valueType: com.example/User", "valueType: User"),
                13,
                "spec.topics[0].valueType",
            ),
            (
                FULL.replace("  consumerGroupId: my-group\n", ""),
                13,
                "spec.consumerGroupId is missing",
            ),
            (
                FULL.replace("    transactionTimeout: 15min\n", ""),
                30,
                "transactionTimeout is needed",
            ),
            (FULL.replace("names/0: 91", "names: 91"), 13, "<topic>/<partition>"),
        ];
        for (text, line, says) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.to_string().starts_with(&format!("module.yaml line {}: ", e.line)));
            assert!(e.message.contains(says), "{e} does not say {says:?}");
            assert_eq!(e.line, line, "{e}");
        }
    }

    #[test]
    fn durations_take_flinks_forms() {
        for (s, ms) in [
            ("2m", 120_000),
            ("1 min", 60_000),
            ("20s", 20_000),
            ("10 sec", 10_000),
            ("15min", 900_000),
            ("100ms", 100),
            ("250", 250),
            ("1d", 86_400_000),
        ] {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        assert!(parse_duration("m").is_err() && parse_duration("5 parsecs").is_err());
    }
}
