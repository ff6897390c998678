//! Calls to agents: HTTPS pinned to the certificate fingerprint each agent
//! registered, with the bearer token it registered. One pooled client per
//! fingerprint (connections are kept alive between polls).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

type Inner = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Where an agent is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAddr {
    /// `https://ip:port`.
    pub base: String,
    /// `sha256:<hex>` it registered.
    pub fingerprint: String,
    /// Its bearer token.
    pub token: String,
}

/// A call that got no HTTP answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// Connection, TLS (including a certificate that is not the registered
    /// one) or protocol failure.
    #[error("{0}")]
    Transport(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The request could not be built.
    #[error("invalid request: {0}")]
    Request(String),
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Body as JSON (`Null` when it is not JSON).
    pub json: serde_json::Value,
}

/// Clients per pinned fingerprint.
#[derive(Clone, Default)]
pub struct AgentClients {
    clients: Arc<Mutex<HashMap<String, Inner>>>,
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl AgentClients {
    fn client(&self, fingerprint: &str) -> Result<Inner, CallError> {
        let mut g = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = g.get(fingerprint) {
            return Ok(c.clone());
        }
        let pin = aula_imager::tls::parse_fingerprint(fingerprint)
            .map_err(|e| CallError::Request(e.to_string()))?;
        let tls = aula_imager::tls::client_config(&aula_imager::tls::ServerTrust::Pin(pin))
            .map_err(|e| CallError::Request(e.to_string()))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let c = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(2)
            .build(conn);
        // Agents come and go with every live boot: keep the map small.
        if g.len() > 4096 {
            g.clear();
        }
        g.insert(fingerprint.to_owned(), c.clone());
        Ok(c)
    }

    /// One JSON call.
    pub async fn call(
        &self,
        agent: &AgentAddr,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let client = self.client(&agent.fingerprint)?;
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| CallError::Request(e.to_string()))?,
            None => Vec::new(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", agent.base));
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let auth = HeaderValue::from_str(&format!("Bearer {}", agent.token))
            .map_err(|e| CallError::Request(e.to_string()))?;
        let req = req
            .header(AUTHORIZATION, auth)
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| CallError::Request(e.to_string()))?;
        let fut = async {
            let resp = client
                .request(req)
                .await
                .map_err(|e| CallError::Transport(chain(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), 4 << 20)
                .collect()
                .await
                .map_err(|e| CallError::Transport(e.to_string()))?
                .to_bytes();
            Ok(Reply {
                status,
                json: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            })
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }
}
