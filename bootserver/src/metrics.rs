//! Prometheus metrics at `GET /metrics` (OpenMetrics text, `prometheus-client`).
//!
//! | metric | labels | counts |
//! |---|---|---|
//! | `aula_dhcp_messages_total` | `subnet`, `type` (`discover`, `offer`, `request`, `ack`, `nak`) | DHCP messages received (discover, request) and sent (offer, ack, nak) |
//! | `aula_tftp_transfers_total` | `result` (`complete`, `failed`, `refused`) | TFTP read requests by outcome |
//! | `aula_tftp_bytes_total` | | file bytes of completed TFTP transfers |
//! | `aula_http_requests_total` | `group`, `status` | HTTP(S) requests by route group and status code |
//! | `aula_http_request_duration_seconds` | `group` | latency histogram (head to response head) |
//! | `aula_repo_chunks_served_total`, `aula_repo_bytes_served_total` | | chunk GETs answered and their bytes |
//! | `aula_repo_uploads_total` | `result` (`stored`, `present`, `refused`) | chunk uploads |
//! | `aula_repo_corrupt_chunks_refused_total` | | uploads refused because the content did not match its id |
//! | `aula_repo_cache_lookups_total` | `result` (`hit`, `miss`) | chunk reads from an S3-backed repository answered from its memory cache (hit) or the bucket (miss) |
//! | `aula_repo_cache_bytes` | | bytes of chunk frames the S3 cache holds (at most `cache_mib`) |
//! | `aula_repo_cache_filled_bytes_total` | | bytes of verified frames put into the S3 cache (by client reads and read-ahead) |
//! | `aula_repo_readahead_total` | `result` (`fetched`, `failed`, `corrupt`) | read-ahead fetches of chunks a restoring client is about to ask for |
//! | `aula_repo_readahead_bytes_total` | | bytes fetched from the bucket by read-ahead |
//! | `aula_agent_registrations_total` | `result` (`new`, `repeat`, `refused`) | agent registrations |
//! | `aula_agents_registered` | | agents currently bound to their machine |
//! | `aula_agent_job_states_total` | `state` | job state changes reported by agents' webhooks |
//! | state gauges added with [`Metrics::add_state_gauge`] | `state` | e.g. deployments by state |
//!
//! Labels are bounded: `subnet` is a configured pool (or `proxy`, `none`),
//! `group` a route group name, `status` an HTTP code, the others fixed
//! sets. No MAC, address or image name is ever a label.
//!
//! The counters live in one process-wide [`Metrics`] ([`global`]): one boot
//! server runs per process, and instrumenting the DHCP, TFTP and
//! repository code needs no handle threaded through their constructors.
//! Counters only rise; a test compares values before and after.
//!
//! Access ([`MetricsConfig`], `[metrics]`): a caller whose address is in
//! `allow`, on either listener; or a bearer token (`metrics.token` /
//! `token_file`, or the API or viewer token) over HTTPS, or over plain
//! HTTP only when HTTPS is off. Anyone else gets 401 or 403.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Deserialize;

use crate::auth::Auth;
use crate::config::Ipv4Net;
use crate::http::{error_json, BoxFuture, HttpRequest, HttpResponse, RequestContext, RouteGroup};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DhcpLabels {
    subnet: String,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    group: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// A scrape-time source of a gauge by state: returns `(state, value)`
/// pairs. The states must come from a bounded set.
pub type StateSource = Arc<dyn Fn() -> Vec<(String, i64)> + Send + Sync>;

struct StateGauge {
    family: Family<StateLabel, Gauge>,
    source: StateSource,
}

/// The job states an agent reports (anything else counts as `other`).
const JOB_STATES: [&str; 5] = ["queued", "running", "succeeded", "failed", "cancelled"];

/// Every metric of the server.
pub struct Metrics {
    registry: Mutex<Registry>,
    dhcp: Family<DhcpLabels, Counter>,
    tftp_transfers: Family<ResultLabel, Counter>,
    tftp_bytes: Counter,
    http_requests: Family<HttpLabels, Counter>,
    http_latency: Family<GroupLabel, Histogram>,
    repo_chunks_served: Counter,
    repo_bytes_served: Counter,
    repo_uploads: Family<ResultLabel, Counter>,
    repo_corrupt: Counter,
    repo_cache: Family<ResultLabel, Counter>,
    repo_cache_bytes: Gauge,
    repo_cache_filled: Counter,
    repo_readahead: Family<ResultLabel, Counter>,
    repo_readahead_bytes: Counter,
    registrations: Family<ResultLabel, Counter>,
    agents: Gauge,
    agents_source: Mutex<Option<Arc<dyn Fn() -> i64 + Send + Sync>>>,
    job_states: Family<StateLabel, Counter>,
    state_gauges: Mutex<Vec<(String, StateGauge)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// The counters of one DHCP subnet, resolved once so that the DHCP loop
/// increments atomics without a label lookup.
#[derive(Clone, Debug)]
pub struct DhcpCounters {
    /// DHCPDISCOVER received.
    pub discover: Counter,
    /// DHCPOFFER sent.
    pub offer: Counter,
    /// DHCPREQUEST received.
    pub request: Counter,
    /// DHCPACK sent.
    pub ack: Counter,
    /// DHCPNAK sent.
    pub nak: Counter,
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("aula");
        let dhcp = Family::<DhcpLabels, Counter>::default();
        r.register(
            "dhcp_messages",
            "DHCP messages received (discover, request) and sent (offer, ack, nak), by subnet",
            dhcp.clone(),
        );
        let tftp_transfers = Family::<ResultLabel, Counter>::default();
        r.register(
            "tftp_transfers",
            "TFTP read requests by outcome",
            tftp_transfers.clone(),
        );
        let tftp_bytes = Counter::default();
        r.register(
            "tftp_bytes",
            "File bytes sent by completed TFTP transfers",
            tftp_bytes.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        r.register(
            "http_requests",
            "HTTP(S) requests by route group and status",
            http_requests.clone(),
        );
        let http_latency =
            Family::<GroupLabel, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        r.register(
            "http_request_duration_seconds",
            "HTTP(S) request latency (to the response head) by route group",
            http_latency.clone(),
        );
        let repo_chunks_served = Counter::default();
        r.register(
            "repo_chunks_served",
            "Repository chunk GETs answered with content",
            repo_chunks_served.clone(),
        );
        let repo_bytes_served = Counter::default();
        r.register(
            "repo_bytes_served",
            "Repository chunk bytes answered",
            repo_bytes_served.clone(),
        );
        let repo_uploads = Family::<ResultLabel, Counter>::default();
        r.register(
            "repo_uploads",
            "Repository chunk uploads by result",
            repo_uploads.clone(),
        );
        let repo_corrupt = Counter::default();
        r.register(
            "repo_corrupt_chunks_refused",
            "Chunk uploads refused because their content does not match their id",
            repo_corrupt.clone(),
        );
        let repo_cache = Family::<ResultLabel, Counter>::default();
        r.register(
            "repo_cache_lookups",
            "Chunk reads of an S3-backed repository by cache result (hit, miss)",
            repo_cache.clone(),
        );
        let repo_cache_bytes = Gauge::default();
        r.register(
            "repo_cache_bytes",
            "Bytes of chunk frames held by the S3-backed repository's cache",
            repo_cache_bytes.clone(),
        );
        let repo_cache_filled = Counter::default();
        r.register(
            "repo_cache_filled_bytes",
            "Bytes of verified chunk frames put into the S3-backed repository's cache",
            repo_cache_filled.clone(),
        );
        let repo_readahead = Family::<ResultLabel, Counter>::default();
        r.register(
            "repo_readahead",
            "Read-ahead fetches of an S3-backed repository by result (fetched, failed, corrupt)",
            repo_readahead.clone(),
        );
        let repo_readahead_bytes = Counter::default();
        r.register(
            "repo_readahead_bytes",
            "Bytes fetched from the bucket by read-ahead",
            repo_readahead_bytes.clone(),
        );
        let registrations = Family::<ResultLabel, Counter>::default();
        r.register(
            "agent_registrations",
            "Agent registrations by result",
            registrations.clone(),
        );
        let agents = Gauge::default();
        r.register(
            "agents_registered",
            "Agents currently bound to their machine",
            agents.clone(),
        );
        let job_states = Family::<StateLabel, Counter>::default();
        r.register(
            "agent_job_states",
            "Job state changes reported by agents' webhooks",
            job_states.clone(),
        );
        Metrics {
            registry: Mutex::new(r),
            dhcp,
            tftp_transfers,
            tftp_bytes,
            http_requests,
            http_latency,
            repo_chunks_served,
            repo_bytes_served,
            repo_uploads,
            repo_corrupt,
            repo_cache,
            repo_cache_bytes,
            repo_cache_filled,
            repo_readahead,
            repo_readahead_bytes,
            registrations,
            agents,
            agents_source: Mutex::new(None),
            job_states,
            state_gauges: Mutex::new(Vec::new()),
        }
    }

    /// The DHCP counters of subnet `subnet` (a configured network, `proxy`
    /// or `none`).
    pub fn dhcp_counters(&self, subnet: &str) -> DhcpCounters {
        let c = |t: &'static str| {
            self.dhcp
                .get_or_create_owned(&DhcpLabels {
                    subnet: subnet.to_owned(),
                    r#type: t,
                })
                .clone()
        };
        DhcpCounters {
            discover: c("discover"),
            offer: c("offer"),
            request: c("request"),
            ack: c("ack"),
            nak: c("nak"),
        }
    }

    /// A TFTP transfer ended: `Some(bytes)` when complete, `None` when it
    /// failed after the client acknowledged.
    pub fn tftp_transfer(&self, bytes: Option<u64>) {
        let result = if bytes.is_some() {
            "complete"
        } else {
            "failed"
        };
        self.tftp_transfers
            .get_or_create(&ResultLabel { result })
            .inc();
        if let Some(b) = bytes {
            self.tftp_bytes.inc_by(b);
        }
    }

    /// A TFTP request was refused (not found, outside the root, …).
    pub fn tftp_refused(&self) {
        self.tftp_transfers
            .get_or_create(&ResultLabel { result: "refused" })
            .inc();
    }

    /// An HTTP request was answered.
    pub fn http_request(&self, group: &'static str, status: u16, latency: Duration) {
        self.http_requests
            .get_or_create(&HttpLabels { group, status })
            .inc();
        self.http_latency
            .get_or_create(&GroupLabel { group })
            .observe(latency.as_secs_f64());
    }

    /// A repository chunk GET answered `bytes` bytes.
    pub fn chunk_served(&self, bytes: u64) {
        self.repo_chunks_served.inc();
        self.repo_bytes_served.inc_by(bytes);
    }

    /// A chunk read of an S3-backed repository: answered from the cache
    /// (`hit`) or not.
    pub fn repo_cache(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.repo_cache.get_or_create(&ResultLabel { result }).inc();
    }

    /// The S3 cache now holds `held` bytes, after a fill of `filled`.
    pub fn repo_cache_held(&self, held: u64, filled: u64) {
        self.repo_cache_bytes
            .set(i64::try_from(held).unwrap_or(i64::MAX));
        self.repo_cache_filled.inc_by(filled);
    }

    /// A read-ahead fetch ended: `fetched` (`bytes` long), `failed` or
    /// `corrupt` (the object is not a chunk frame; not cached).
    pub fn repo_readahead(&self, result: &'static str, bytes: u64) {
        self.repo_readahead
            .get_or_create(&ResultLabel { result })
            .inc();
        self.repo_readahead_bytes.inc_by(bytes);
    }

    /// A chunk upload ended: `stored` (new), `present` (already held) or
    /// `refused`; `corrupt` when refused because its content is wrong.
    pub fn chunk_upload(&self, result: &'static str, corrupt: bool) {
        self.repo_uploads
            .get_or_create(&ResultLabel { result })
            .inc();
        if corrupt {
            self.repo_corrupt.inc();
        }
    }

    /// An agent registration: `new`, `repeat` or `refused`.
    pub fn registration(&self, result: &'static str) {
        self.registrations
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// An agent's webhook reported a job state change.
    pub fn job_state(&self, state: &str) {
        let state = JOB_STATES
            .iter()
            .find(|s| **s == state)
            .copied()
            .unwrap_or("other");
        self.job_states
            .get_or_create(&StateLabel {
                state: state.to_owned(),
            })
            .inc();
    }

    /// Sets where the number of registered agents is read at each scrape.
    pub fn set_agents_source(&self, f: Arc<dyn Fn() -> i64 + Send + Sync>) {
        if let Ok(mut g) = self.agents_source.lock() {
            *g = Some(f);
        }
    }

    /// Adds (or replaces) a gauge `aula_<name>{state=…}` read from `source`
    /// at each scrape. This is the hook for state kept elsewhere, such as
    /// deployments by state: `add_state_gauge("deployments", "…", src)`.
    pub fn add_state_gauge(&self, name: &str, help: &str, source: StateSource) {
        let Ok(mut gauges) = self.state_gauges.lock() else {
            return;
        };
        if let Some((_, g)) = gauges.iter_mut().find(|(n, _)| n == name) {
            g.source = source;
            return;
        }
        let family = Family::<StateLabel, Gauge>::default();
        if let Ok(mut r) = self.registry.lock() {
            r.register(name, help, family.clone());
        }
        gauges.push((name.to_owned(), StateGauge { family, source }));
    }

    /// The OpenMetrics text of every metric, scrape-time gauges refreshed.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let agents = self.agents_source.lock().ok().and_then(|g| g.clone());
        if let Some(f) = agents {
            self.agents.set(f());
        }
        if let Ok(gauges) = self.state_gauges.lock() {
            for (_, g) in gauges.iter() {
                g.family.clear();
                for (state, v) in (g.source)() {
                    g.family.get_or_create(&StateLabel { state }).set(v);
                }
            }
        }
        let mut out = String::new();
        match self.registry.lock() {
            Ok(r) => prometheus_client::encoding::text::encode(&mut out, &r)?,
            Err(_) => return Err(std::fmt::Error),
        }
        Ok(out)
    }
}

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~12 s.
    Histogram::new(exponential_buckets(0.0005, 2.5, 12))
}

/// `[metrics]`: who may read `GET /metrics` (the default, for a missing
/// section: off).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` (on both listeners).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Addresses (CIDR) allowed without a token, e.g. `["127.0.0.1/32"]`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// A token for scrapers (`Authorization: Bearer …`), besides the API
    /// and viewer tokens. Honoured over HTTPS (or when HTTPS is off).
    #[serde(default)]
    pub token: Option<String>,
    /// The token as the first line of a file.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

impl MetricsConfig {
    /// The allow list, parsed (`key` errors name `metrics.allow`).
    pub fn allow_nets(&self) -> Result<Vec<Ipv4Net>, crate::config::ConfigError> {
        self.allow
            .iter()
            .map(|s| {
                Ipv4Net::parse(s).map_err(|message| crate::config::ConfigError::Invalid {
                    key: "metrics.allow".into(),
                    message,
                })
            })
            .collect()
    }

    /// Checks the section.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        self.allow_nets()?;
        if let Some(t) = &self.token {
            if t.len() < 16 {
                return Err(crate::config::ConfigError::Invalid {
                    key: "metrics.token".into(),
                    message: "token must be at least 16 characters".into(),
                });
            }
        }
        Ok(())
    }
}

/// The `/metrics` route group.
pub struct MetricsRoutes {
    allow: Vec<Ipv4Net>,
    token: Option<String>,
    auth: Arc<Auth>,
    tls_on: bool,
}

impl MetricsRoutes {
    /// `token` is the scrape token (already read from its file), `auth`
    /// knows the API and viewer tokens, `tls_on` says whether an HTTPS
    /// listener runs (then tokens are not accepted over plain HTTP).
    pub fn new(
        cfg: &MetricsConfig,
        token: Option<String>,
        auth: Arc<Auth>,
        tls_on: bool,
    ) -> Result<Self, crate::config::ConfigError> {
        Ok(Self {
            allow: cfg.allow_nets()?,
            token,
            auth,
            tls_on,
        })
    }

    fn allowed(
        &self,
        req: &HttpRequest,
        ctx: RequestContext,
    ) -> Result<(), (StatusCode, &'static str)> {
        let ip = match ctx.remote.ip() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        };
        if ip.is_some_and(|ip| self.allow.iter().any(|n| n.contains(ip))) {
            return Ok(());
        }
        let Some(cred) = crate::http::credential(req) else {
            return Err((
                StatusCode::UNAUTHORIZED,
                "metrics need a token or an allow-listed address ([metrics] allow)",
            ));
        };
        if self.tls_on && !ctx.secure {
            return Err((
                StatusCode::FORBIDDEN,
                "a metrics token is accepted over HTTPS only",
            ));
        }
        let scrape = self
            .token
            .as_deref()
            .is_some_and(|t| aula_imager::tls::secrets_equal(cred.as_bytes(), t.as_bytes()));
        if scrape || self.auth.identify(cred).is_some_and(|p| p.can_read_lab()) {
            Ok(())
        } else {
            Err((StatusCode::FORBIDDEN, "this token may not read metrics"))
        }
    }
}

impl RouteGroup for MetricsRoutes {
    fn name(&self) -> &'static str {
        "metrics"
    }

    fn matches(&self, path: &str) -> bool {
        path == "/metrics"
    }

    fn plain_http(&self) -> bool {
        // Allow-listed scrapers may use plain HTTP; tokens are refused
        // there while HTTPS runs (see `allowed`).
        true
    }

    fn handle(&self, req: HttpRequest, ctx: RequestContext) -> BoxFuture<'_, HttpResponse> {
        Box::pin(async move {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return error_json(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics");
            }
            if let Err((status, why)) = self.allowed(&req, ctx) {
                return error_json(status, why);
            }
            match global().encode() {
                Ok(text) => {
                    let mut r = crate::http::response(StatusCode::OK, "text/plain", text);
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(_) => error_json(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_metrics_carry_counts_and_bounded_job_states() {
        let m = Metrics::new();
        let c = m.dhcp_counters("10.9.0.0/24");
        c.ack.inc();
        c.ack.inc();
        m.job_state("running");
        m.job_state("<script>");
        m.add_state_gauge(
            "deployments",
            "Deployments by state",
            Arc::new(|| vec![("running".into(), 3)]),
        );
        let text = m.encode().expect("encode");
        assert!(
            text.contains(r#"aula_dhcp_messages_total{subnet="10.9.0.0/24",type="ack"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"aula_agent_job_states_total{state="other"} 1"#));
        assert!(!text.contains("script"));
        assert!(
            text.contains(r#"aula_deployments{state="running"} 3"#),
            "{text}"
        );
    }
}
